"""AutoAWQ GEMM checkpoints: packing against AutoAWQ's own WQLinear_GEMM.from_linear, dequantization sweeps,
end to end against a dequantized reference, and the error paths."""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from quantkit.config import ModelConfig
from quantkit.layers.linear import Linear
from quantkit.quant.awq import AWQConfig
from quantkit.quant.primitives import awq_deinterleave, awq_interleave, pack, unpack
from quantkit.quant.wna16 import dequantize_kernel_weights


def awq_qparams(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ's quantizer (range not forced to include 0): w [N, K] -> scales fp16, zeros int [N, K/G]."""
    g = w.shape[1] if group_size == -1 else group_size
    groups = w.unflatten(1, (-1, g))
    lo, hi = groups.amin(-1), groups.amax(-1)
    scales = ((hi - lo).clamp(min=1e-5) / 15).half()
    zeros = torch.clamp(-torch.round(lo / scales.float()), 0, 15).to(torch.int32)
    return scales, zeros


def awq_tensors(w: torch.Tensor, group_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A GEMM checkpoint layer from weight [N, K] -> (qweight/qzeros/scales, dequantized [N, K])."""
    g = w.shape[1] if group_size == -1 else group_size
    scales, zeros = awq_qparams(w, group_size)
    s, z = scales.float().repeat_interleave(g, 1), zeros.repeat_interleave(g, 1)
    codes = torch.clamp(torch.round(w / s) + z, 0, 15).to(torch.int32)
    return {"qweight": pack(awq_interleave(codes.t()), 4, 1), "qzeros": pack(awq_interleave(zeros.t()), 4, 1),
            "scales": scales.t()}, (codes - z).float() * s


@pytest.fixture(scope="module")
def autoawq_gemm():
    """AutoAWQ's WQLinear_GEMM without running awq/__init__ (which needs `datasets` and CUDA extensions)."""
    spec = importlib.util.find_spec("awq")
    if spec is None:
        pytest.skip("autoawq is not installed")
    saved = sys.modules.get("awq")
    stub = types.ModuleType("awq")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["awq"] = stub
    try:
        from awq.modules.linear.gemm import WQLinear_GEMM
        yield WQLinear_GEMM
    finally:
        for name in [n for n in sys.modules if n == "awq" or n.startswith("awq.")]:
            del sys.modules[name]
        if saved is not None:
            sys.modules["awq"] = saved


def test_interleave_roundtrip():
    x = torch.arange(32).view(2, 16)
    assert awq_interleave(x)[0, :8].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(awq_deinterleave(awq_interleave(x)), x)


@pytest.mark.parametrize("n,k,group", [(192, 576, 64), (64, 256, 128), (96, 192, 32)])
def test_packing_matches_autoawq(autoawq_gemm, n, k, group):
    """Weights on the grid (w = (q - z) * s), so AutoAWQ's unclamped rounding recovers q exactly."""
    gen = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (n, k // group), generator=gen, dtype=torch.int32)
    scales = (0.01 + torch.rand(n, k // group, generator=gen) / 10).half()
    w = (codes - zeros.repeat_interleave(group, 1)).float() * scales.float().repeat_interleave(group, 1)
    linear = torch.nn.Linear(k, n, bias=False)
    linear.weight.data = w
    ref = autoawq_gemm.from_linear(linear, 4, group, scales=scales.t().contiguous(), zeros=zeros.t().contiguous())
    assert torch.equal(pack(awq_interleave(codes.t()), 4, dim=1), ref.qweight)
    assert torch.equal(pack(awq_interleave(zeros.t()), 4, dim=1), ref.qzeros)
    assert torch.equal(awq_deinterleave(unpack(ref.qweight, 4, n, dim=1)), codes.t())


@pytest.mark.parametrize("k,sizes,group", [(576, [192, 576], 64), (1536, [576], 128), (192, [64, 64], 32),
                                           (576, [192, 64, 64], -1)])
def test_dequantize_matches_formula(k, sizes, group):
    layer = Linear(k, sizes, False, torch.float32, AWQConfig(group_size=group), "model.layers.0.mlp.gate_up_proj",
                   [f"s{i}" for i in range(len(sizes))])
    gen = torch.Generator().manual_seed(k)
    deqs = []
    for shard, n in enumerate(sizes):
        tensors, deq = awq_tensors(torch.randn(n, k, generator=gen), group)
        for name, t in tensors.items():
            layer.load_weight(getattr(layer, name), t, shard if len(sizes) > 1 else None)
        deqs.append(deq)
    layer.quant_method.process_weights_after_loading(layer)
    ref = torch.cat(deqs)
    w = dequantize_kernel_weights(layer.qweight, layer.qzeros, layer.scales, 4, k if group == -1 else group, k)
    assert torch.equal(w, ref.t())
    x = torch.randn(3, k, generator=gen)
    torch.testing.assert_close(layer(x), x @ ref.t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", [{"bits": 4, "group_size": 64, "version": "GEMM"},
                                    {"w_bit": 4, "q_group_size": 64, "version": "gemm"}])
def test_end_to_end_matches_dequantized_reference(tmp_path, helpers, qh, config):
    qc = {"quant_method": "awq", "zero_point": True, "modules_to_not_convert": ["o_proj"], **config}
    q_dir, ref_dir = qh.write_pair(tmp_path, helpers, lambda m, w: awq_tensors(w, 64), qc,
                                   keep=lambda m: m.endswith("o_proj"))
    ours = qh.load_ours(q_dir)
    assert hasattr(ours.model.layers[0].self_attn.o_proj, "weight")
    layers = qh.quantized_layers(ours)
    assert len(layers) == 6
    for layer in layers:
        assert qh.layer_bytes(layer) == pytest.approx(qh.theory_bytes(layer, 4, 64), rel=0.05)
    seqs = helpers.random_seqs([7, 11], 256, seed=2)
    got, want = helpers.ours_logits(ours, seqs), helpers.ours_logits(qh.load_ours(ref_dir), seqs)
    assert helpers.max_rel_err(got, want) < 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("config,match", [({"version": "gemv"}, "gemv"), ({"bits": 8}, "bits=8"),
                                          ({"zero_point": False}, "zero_point"), ({"group_size": 0}, "group_size")])
def test_bad_awq_configs(config, match):
    with pytest.raises(ValueError, match=match):
        AWQConfig.from_config({"quant_method": "awq", **config}, on_the_fly=False)


def test_verify_names_layers(embedded_source):
    cfg = ModelConfig.from_hf(embedded_source.hf_config)
    with pytest.raises(ValueError, match=r"model\.layers\.\*\.mlp\.gate_up_proj: in_features 576 not divisible by "
                                         r"group_size 128 \(use group_size 64\)"):
        AWQConfig().verify(cfg)
    AWQConfig(group_size=64).verify(cfg)
    odd = ModelConfig.from_hf({**embedded_source.hf_config, "intermediate_size": 1540})
    with pytest.raises(ValueError, match=r"model\.layers\.\*\.mlp\.gate_proj: out_features 1540 .*multiple of 8"):
        AWQConfig(group_size=-1).verify(odd)
    with pytest.raises(ValueError, match="needs an AWQ-quantized checkpoint"):
        AWQConfig.from_config({"quant_method": "awq"}, on_the_fly=True)
