"""GPTQ on seeded random layers: beats RTN on correlated inputs, codes/qparams/g_idx follow FORMATS §1, and the
damping, dead-column and ragged-shape paths."""
from __future__ import annotations

import pytest
import torch

from quantkit.calibrate.gptq import GPTQConfig, HessianAccumulator, dequantize, gptq_quantize
from quantkit.quant.primitives import minmax_qparams, quantize

K, N, T = 576, 192, 2048  # neither K nor N divides the 128 block


@pytest.fixture(scope="module")
def layer():
    """(X [T, K] with correlated, unevenly scaled columns, W [N, K], H [K, K] streamed in uneven batches)."""
    gen = torch.Generator().manual_seed(0)
    z, a = torch.randn(T, K, generator=gen), torch.randn(K, K, generator=gen) / K ** 0.5
    x = (z @ a + 0.1 * torch.randn(T, K, generator=gen)) * 3 * torch.rand(K, generator=gen)
    w = torch.randn(N, K, generator=gen)
    acc = HessianAccumulator(K)
    for chunk in x.split(700):
        acc.add_batch(chunk.view(-1, 7, K) if chunk.shape[0] % 7 == 0 else chunk)
    return x, w, acc.hessian


def rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    scales, zeros = minmax_qparams(w, bits, group_size, sym)
    g_idx = torch.arange(w.shape[1]) // (w.shape[1] if group_size == -1 else group_size)
    return dequantize(quantize(w, scales, zeros, bits, group_size), scales.T, zeros.T, g_idx)


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return (x @ w.T - x @ w_hat.T).norm().item()


def test_hessian_is_running_mean_of_2xtx(layer):
    x, _, h = layer
    torch.testing.assert_close(h, 2 / T * x.T @ x, rtol=1e-4, atol=1e-4)


CASES = [(g, sym, act, static) for g in (64, -1) for sym in (True, False)
         for act, static in ((False, False), (True, False), (True, True)) if not (g == -1 and static)]


@pytest.mark.parametrize("group_size,sym,desc_act,static_groups", CASES + [(128, False, True, False)])  # ragged
def test_beats_rtn_and_dequantizes_exactly(layer, group_size, sym, desc_act, static_groups):
    x, w, h = layer
    r = gptq_quantize(w, h, GPTQConfig(4, group_size, sym, desc_act, static_groups))
    ng = 1 if group_size == -1 else -(-K // group_size)
    assert r.codes.shape == (N, K) and r.codes.dtype == torch.int32
    assert r.scales.shape == r.zeros.shape == (ng, N) and r.g_idx.shape == (K,)
    assert 0 <= r.codes.min() and r.codes.max() <= 15
    if sym:
        assert (r.zeros == 8).all()
    assert torch.equal(dequantize(r.codes, r.scales, r.zeros, r.g_idx), r.weight)
    assert output_error(x, w, r.weight) < 0.85 * output_error(x, w, rtn(w, 4, group_size, sym))


def test_g_idx_semantics(layer):
    _, w, h = layer
    perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    trivial = torch.arange(K) // 64
    plain = gptq_quantize(w, h, GPTQConfig(group_size=64))
    assert torch.equal(plain.g_idx, trivial.int())
    act = gptq_quantize(w, h, GPTQConfig(group_size=64, desc_act=True))
    assert torch.equal(act.g_idx, (torch.argsort(perm) // 64).int())  # (position of column k in perm) // G
    assert (act.g_idx.diff() < 0).any()                                 # non-monotonic
    assert torch.equal(torch.bincount(act.g_idx), torch.full((K // 64,), 64))
    static = gptq_quantize(w, h, GPTQConfig(group_size=64, desc_act=True, static_groups=True))
    assert torch.equal(static.g_idx, trivial.int())
    scales, zeros = minmax_qparams(w, 4, 64, True)  # static groups: qparams of the untouched original groups
    assert torch.equal(static.scales, scales.T) and torch.equal(static.zeros, zeros.T)


def test_dead_columns_are_zeroed(layer):
    x, w, _ = layer
    x = x.clone()
    x[:, [3, 200]] = 0
    r = gptq_quantize(w, 2 / T * x.T @ x, GPTQConfig(group_size=64, sym=False, desc_act=True))
    assert (r.weight[:, [3, 200]] == 0).all()
    assert torch.isfinite(r.weight).all()


def indefinite_hessian(min_eig: float, k: int = 64) -> torch.Tensor:
    """Q diag(1, ..., 1, min_eig) Q^T: mean diagonal ~1, one eigenvalue min_eig."""
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(1)))
    eig = torch.ones(k)
    eig[-1] = min_eig
    return (q * eig) @ q.T


def test_damping_is_increased_until_cholesky_succeeds():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    r = gptq_quantize(w, indefinite_hessian(-0.03), GPTQConfig(group_size=32, damp_percent=0.01))
    assert 0.03 < r.damp_percent < 0.04
    assert torch.isfinite(r.weight).all()


def test_cholesky_failure_reports_damping():
    w = torch.randn(32, 64)
    with pytest.raises(ValueError, match=r"damp_percent 0\.01 to 0\.96 \(20 tries\)"):
        gptq_quantize(w, indefinite_hessian(-5.0), GPTQConfig(group_size=32, damp_auto_increment=0.05))
    with pytest.raises(ValueError, match=r"damp_percent 0\.01 to 0\.01 \(1 tries\)"):
        gptq_quantize(w, indefinite_hessian(-0.03), GPTQConfig(group_size=32, damp_auto_increment=0))
    with pytest.raises(ValueError, match="NaN or inf"):
        gptq_quantize(w, torch.full((64, 64), float("nan")), GPTQConfig(group_size=32))


@pytest.mark.parametrize("kwargs,field", [({"bits": 5}, "bits"), ({"group_size": 0}, "group_size"),
                                          ({"damp_percent": 0}, "damp_percent"), ({"block_size": 0}, "block_size"),
                                          ({"damp_auto_increment": -1}, "damp_auto_increment")])
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPTQConfig(**kwargs)


def test_hessian_shape_mismatch():
    with pytest.raises(ValueError, match="in_features 8"):
        gptq_quantize(torch.zeros(4, 8), torch.eye(16), GPTQConfig())
