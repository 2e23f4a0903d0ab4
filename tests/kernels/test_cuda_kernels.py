"""The CUDA kernels of csrc/ (kernels/cuda_gemv.py, cuda_gemm.py: GEMV, mma.sync GEMM, wgmma GEMM) against the torch reference, and their build helper
(kernels/cuda_ext.py): on a machine without CUDA or without nvcc it reports why, and selection falls back."""
from __future__ import annotations

import logging
import threading

import pytest
import torch

from quantkit.kernels import cuda_ext, select
from quantkit.kernels.cuda_gemm import mma_order, nf4_operands, wgmma_tile_rows
from quantkit.kernels.cuda_gemv import k_slices
from quantkit.quant.primitives import pack, unpack
from quantkit.kernels.base import BUCKETS
from tests.kernels.conftest import DEVICE, assert_workspace_clean, capture, check, gpu, nf4_layer, wna16_layer

bf16, fp16 = torch.bfloat16, torch.float16

# (M, N, K, group, sym, act_order, dtype, bias). K = 576 and 4160 leave a ragged last group of 128 (and 4160 a
# ragged last GEMM stage); N = 576 and 4160 are not multiples of the 256- (GEMV) or 128-column (GEMM) tile; M > 16
# runs in blocks of 32 (GEMV) or 16 / 32 / 64 rows (GEMM), the last one short; the GEMV runs M = 129 and 300 in
# pieces of MAX_M = 64.
WNA16_CASES = [
    (1, 576, 576, 128, True, True, bf16, True),
    (1, 4096, 4096, 128, False, False, bf16, False),
    (2, 1536, 576, -1, True, False, fp16, True),
    (3, 576, 1536, 32, False, True, fp16, False),
    (5, 4160, 1536, 64, False, True, bf16, True),
    (7, 1536, 4160, 128, True, False, fp16, True),
    (8, 576, 4160, 32, False, False, bf16, True),
    (9, 4160, 576, 64, True, True, bf16, False),
    (12, 1536, 1536, -1, False, True, fp16, True),
    (15, 4096, 14336, 128, True, True, bf16, True),
    (16, 6144, 4096, 128, False, False, fp16, True),
    (16, 576, 4160, 64, True, True, bf16, True),
    (37, 576, 576, 128, False, True, bf16, True),
    (64, 4160, 1536, 64, True, True, fp16, False),
    (129, 1536, 4160, 128, False, False, bf16, True),
    (256, 4096, 4096, 128, False, True, bf16, False),
    (300, 576, 4160, 32, True, False, bf16, True),
]
# (M, shard sizes, K, quant type, double quant, dtype, bias): nested groups straddle rows and shards; N = 200 and
# 4160 are not multiples of the 128-row tile (N = 198 not even of 4: past 8 rows the split's partials leave as scalar
# atomics, not 16-byte reductions); M > 16 runs in blocks of 32 or 64 rows, beyond 64 in pieces.
NF4_CASES = [
    (1, [4096], 4096, "nf4", True, bf16, False),
    (13, [198], 1536, "nf4", True, bf16, True),
    (1, [96, 160], 576, "nf4", True, bf16, True),
    (3, [1536], 576, "nf4", False, fp16, True),
    (6, [200], 1536, "fp4", True, bf16, True),
    (8, [576, 64], 1536, "nf4", True, fp16, False),
    (11, [4160], 576, "nf4", True, bf16, True),
    (16, [14336, 14336], 4096, "nf4", True, bf16, True),
    (16, [4096], 14336, "nf4", True, fp16, False),
    (23, [576], 576, "nf4", True, bf16, True),
    (64, [4160], 1536, "nf4", True, fp16, True),
    (100, [200, 96], 576, "fp4", False, bf16, False),
    (257, [1536], 4096, "nf4", True, bf16, True),
]


def _cls(name: str):
    return select.kernel_class(name)


def _skip_unless_implemented(name: str, layer) -> None:
    """The wgmma GEMMs run on sm_90 only, the NF4 GEMMs need N % 8 == 0: elsewhere their tests skip with the
    refusal."""
    ok, reason = _cls(name).can_implement(layer, layer.quant_method, DEVICE)
    if not ok and name in ("cuda_wna16_wgmma", "cuda_nf4_wgmma", "cuda_nf4_gemm"):
        pytest.skip(reason)


@pytest.mark.parametrize("name", ["cuda_wna16_gemv", "cuda_wna16_gemm", "cuda_wna16_wgmma"])
@pytest.mark.parametrize("m,n,k,group,sym,act,dtype,bias", WNA16_CASES)
@gpu
def test_wna16_matches_reference(m, n, k, group, sym, act, dtype, bias, name, gen):
    layer = wna16_layer(k, n, 4, group, sym, act, dtype, bias=bias, gen=gen)
    _skip_unless_implemented(name, layer)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    assert check(layer, _cls(name), x, bias=bias) is not None
    assert_workspace_clean()


@pytest.mark.parametrize("adjacent_pairs", [False, True])
def test_mma_order_puts_a_lanes_fragment_rows_in_one_word(adjacent_pairs, gen):
    """In each 32 rows of K, word row c holds the k pairs (2 c, 2 c + 1) and (2 c + 8, 2 c + 9) of the two k16
    halves that lane c of a quad feeds to the mma (csrc/kernels.h): pair a (rows 2 c + 8 a, + 1) in nibbles
    (a, a + 4), or (2 a, 2 a + 1) for code-table layers; rows past K (here 72 -> 96) are code 0."""
    k, n = 72, 24
    codes = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    ordered = unpack(mma_order(pack(codes, 4, dim=0), adjacent_pairs), 4, 96, dim=0)
    padded = torch.cat([codes, torch.zeros(96 - k, n, dtype=torch.int32)])
    for chunk in range(3):
        for c in range(4):
            for a in range(4):
                for h in range(2):
                    nibble = 2 * a + h if adjacent_pairs else a + 4 * h
                    row = 32 * chunk + 2 * c + 8 * a + h
                    assert torch.equal(ordered[32 * chunk + 8 * c + nibble], padded[row])


@pytest.mark.parametrize("double", [True, False])
def test_nf4_operands_hold_the_layers_codes_and_absmax(double, gen):
    """What the NF4 GEMMs read: code (k, n) at its mma-order place (adjacent pairs), the absmax of block
    (n, k // 64) resolved through both levels as scale (k // 64, n), and the code in the activation dtype."""
    from quantkit.quant import bnb_format
    from quantkit.quant.nf4 import dequantize_layer, resolved_absmax
    k, sizes = 192, [40, 24]
    layer = nf4_layer(k, sizes, "nf4", double, bf16, bias=False, gen=gen).cpu()
    method = layer.quant_method
    ops = nf4_operands(layer, method)
    packed = layer.weight_packed
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).view(sum(sizes), k).int()  # [N, K]
    assert torch.equal(ops.qweight, mma_order(pack(codes.t().contiguous(), 4, dim=0), adjacent_pairs=True))
    assert torch.equal(ops.scales, resolved_absmax(layer, method.config).t().to(bf16))
    assert ops.group_size == 64 and ops.qzeros is None
    assert torch.equal(ops.code_table, bnb_format.code4("nf4").to(bf16))
    dequant = ops.code_table.float()[codes.t().long()] * ops.scales.float().repeat_interleave(64, 0)
    assert torch.allclose(dequant, dequantize_layer(layer, method.config, torch.float32).t(), rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("name", ["cuda_nf4_gemv", "cuda_nf4_gemm", "cuda_nf4_wgmma"])
@pytest.mark.parametrize("m,sizes,k,quant_type,double,dtype,bias", NF4_CASES)
@gpu
def test_nf4_matches_reference(m, sizes, k, quant_type, double, dtype, bias, name, gen):
    layer = nf4_layer(k, sizes, quant_type, double, dtype, bias=bias, gen=gen)
    _skip_unless_implemented(name, layer)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    assert check(layer, _cls(name), x, bias=bias) is not None
    assert_workspace_clean()


@gpu
def test_large_activations_stay_finite(gen):
    """fp16 activations near the top of their range and huge bf16 ones: products and sums stay in fp32."""
    layer = wna16_layer(1536, 576, 4, 64, False, True, fp16, bias=False, gen=gen, scale=1e-4)
    x = (torch.randn(5, 1536, generator=gen) * 2e4).clamp(-6e4, 6e4).to(fp16).to(DEVICE)
    assert check(layer, _cls("cuda_wna16_gemv"), x, bias=False) is not None
    huge = (torch.randn(5, 1536, generator=gen) * 1e15).to(bf16).to(DEVICE)
    layer = wna16_layer(1536, 576, 4, 128, True, False, bf16, bias=False, gen=gen)
    assert check(layer, _cls("cuda_wna16_gemv"), huge, bias=False) is not None
    assert check(layer, _cls("cuda_wna16_gemm"), torch.cat([huge] * 9), bias=False) is not None
    if _cls("cuda_wna16_wgmma").can_implement(layer, layer.quant_method, DEVICE)[0]:
        assert check(layer, _cls("cuda_wna16_wgmma"), torch.cat([huge] * 60), bias=False) is not None
    layer = nf4_layer(1536, [576], "nf4", True, bf16, bias=False, gen=gen)
    assert check(layer, _cls("cuda_nf4_gemv"), huge, bias=False) is not None
    assert check(layer, _cls("cuda_nf4_gemm"), torch.cat([huge] * 9), bias=False) is not None
    if _cls("cuda_nf4_wgmma").can_implement(layer, layer.quant_method, DEVICE)[0]:
        assert check(layer, _cls("cuda_nf4_wgmma"), torch.cat([huge] * 60), bias=False) is not None


@pytest.mark.parametrize("m", [4, 40])
@gpu
def test_graph_replay_matches_reference(m, gen):
    """Captured once, replayed on new activations: the split-K workspace is reused and left clean."""
    layers = [(wna16_layer(4096, 1536, 4, 128, False, True, bf16, bias=True, gen=gen), "cuda_wna16_gemv"),
              (wna16_layer(4096, 1536, 4, 128, False, True, bf16, bias=True, gen=gen), "cuda_wna16_gemm"),
              (wna16_layer(4096, 1536, 4, 128, False, True, bf16, bias=True, gen=gen), "cuda_wna16_wgmma"),
              (nf4_layer(4096, [1536], "nf4", True, bf16, bias=True, gen=gen), "cuda_nf4_gemv")]
    for layer, name in layers:
        if not _cls(name).can_implement(layer, layer.quant_method, DEVICE)[0]:
            continue
        kernel = _cls(name)(layer, layer.quant_method)
        assert kernel.split(m)[0] > 1  # the split-K path: that is what is captured
        x = torch.randn(m, 4096, generator=gen).to(bf16).to(DEVICE)
        graph, out = capture(lambda: kernel.apply(layer, x, layer.bias))
        for _ in range(2):
            x.copy_(torch.randn(m, 4096, generator=gen).to(bf16))
            graph.replay()
            ref = layer.quant_method.reference_apply(layer, x, layer.bias).float()
            assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
        assert_workspace_clean()


@gpu
def test_selection_puts_the_gemv_first_at_small_m(gen, caplog, monkeypatch):
    monkeypatch.setattr(select, "_logged", set())
    with caplog.at_level(logging.INFO, logger="quantkit.kernels.select"):
        w4 = wna16_layer(1536, 576, 4, 128, False, True, bf16, bias=False, gen=gen)
        nf4 = nf4_layer(1536, [576], "nf4", True, fp16, bias=False, gen=gen)
        w4_fp32 = wna16_layer(1536, 512, 4, 128, True, False, torch.float32, bias=False, gen=gen)
    for layer, name in [(w4, "cuda_wna16_gemv"), (nf4, "cuda_nf4_gemv")]:
        limit = _cls(name).M_RANGE[1]
        served = [b.max_m is not None and b.max_m <= limit for b in BUCKETS]
        assert [n == name for n in layer.quant_method.kernels.names()] == served
    # m<=8 | m<=16, m<=32 | m<=64, m<=256, m<=1024 (the wgmma GEMM on sm_90, else mma.sync to 256) | m>1024
    middle = (["cuda_wna16_wgmma"] * 3 if _cls("cuda_wna16_wgmma").can_implement(w4, w4.quant_method, DEVICE)[0]
              else ["cuda_wna16_gemm"] * 2 + ["wna16_dequant_cublas"])
    assert w4.quant_method.kernels.names() == (["cuda_wna16_gemv"] + ["cuda_wna16_gemm"] * 2 + middle +
                                               ["wna16_dequant_cublas"])
    assert w4_fp32.quant_method.kernels.names()[0] == "triton_wna16_splitk"
    assert "cuda_wna16_gemv: torch.float32 activations" in caplog.text


@gpu
@pytest.mark.parametrize("m,k", [(1, 576), (9, 4160), (64, 1536)])
def test_permute_cols_matches_index_select(gen, m, k):
    """Act-order's activation permute (beyond GATHER_MAX_M rows) equals index_select."""
    cuda_ext.load()
    x = torch.randn(m, k, generator=gen).to(bf16).to(DEVICE)
    perm = torch.randperm(k, generator=gen).to(torch.int32).to(DEVICE)
    assert torch.equal(torch.ops.quantkit.permute_cols(x, perm), x.index_select(1, perm))


BAD_CALLS = {  # what breaks the call (the arguments it replaces) -> the error it must raise
    "x float32": (lambda a: {"x": a["x"].float()}, "x must be bfloat16 or float16, got Float"),
    "qweight rows": (lambda a: {"qweight": a["qweight"][:-1]},
                     r"qweight must be int32 \[K/8, N\] = \[32, 128\] \(4-bit\), got Int \[31, 128\]"),
    "qzeros dtype": (lambda a: {"qzeros": a["qzeros"].float()},
                     r"qzeros must be int32 \[NG, N/8\] = \[2, 16\], got Float"),
    "scales on cpu": (lambda a: {"scales": a["scales"].cpu()}, "scales must be on cuda:0, got cpu"),
    "K not a multiple of 8": (lambda a: {"x": torch.randn(2, 260, device=DEVICE, dtype=torch.bfloat16)},
                              "K and N multiples of 8, got K = 260, N = 128"),
    "splits": (lambda a: {"splits": 3}, "splits 3 does not cover the 8 K steps in slices of 32"),
    "perm length": (lambda a: {"perm": a["perm"][:-8]}, r"perm must be int32 \[K\] = \[256\], got Int \[248\]"),
}


def _gemv_args(gen: torch.Generator, k: int = 256, n: int = 128) -> dict:
    """Valid arguments of torch.ops.quantkit.wna16_gemv (4-bit, group 128, act-order, one K slice)."""
    return {"x": torch.randn(2, k, generator=gen).to(DEVICE, torch.bfloat16),
            "qweight": torch.randint(-2 ** 31, 2 ** 31 - 1, (k // 8, n), generator=gen, dtype=torch.int32).to(DEVICE),
            "qzeros": torch.randint(-2 ** 31, 2 ** 31 - 1, (-(-k // 128), n // 8), generator=gen,
                                    dtype=torch.int32).to(DEVICE),
            "scales": torch.rand(-(-k // 128), n, generator=gen).to(DEVICE, torch.bfloat16),
            "perm": torch.randperm(k, generator=gen).int().to(DEVICE), "bias": None, "group_size": 128,
            "splits": 1, "steps_per_block": 32, "ws": torch.zeros(2 ** 16, device=DEVICE),
            "cnt": torch.zeros(2 ** 10, dtype=torch.int32, device=DEVICE)}


@gpu
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_calls_raise_what_is_wrong(case, gen):
    """Every check of the bindings raises a RuntimeError naming the problem (a check that streamed a number into its
    message used to crash the process on the H100 machine)."""
    ops, why = cuda_ext.load()
    assert ops is not None, why
    args = _gemv_args(gen)
    change, message = BAD_CALLS[case]
    with pytest.raises(RuntimeError, match=message):
        ops.wna16_gemv(**(args | change(args)))


GEMM_BAD_CALLS = {
    "qweight in the GEMV's layout": (lambda a: {"qweight": a["qweight"][:33]},
                                     r"qweight must be int32 \[K32/8, N\] = \[36, 128\] \(4-bit\), got Int \[33, 128\]"),
    "x not 16-byte aligned": (lambda a: {"x": torch.randn(2 * 264 + 1, device=DEVICE).to(bf16)[1:].view(2, 264)},
                              "x must be 16-byte aligned"),
    "slices": (lambda a: {"stages_per_block": 1}, "splits 1 does not cover the 3 K steps in slices of 1"),
    "zero points and a code table": (lambda a: {"code_table": torch.zeros(16, device=DEVICE, dtype=bf16)},
                                     "wna16_gemm takes either qzeros .* or code_table .*, not both"),
    "neither": (lambda a: {"qzeros": None}, "wna16_gemm takes either qzeros .* or code_table .*, not neither"),
    "code table dtype": (lambda a: {"qzeros": None, "code_table": torch.zeros(16, device=DEVICE)},
                         r"code_table must be BFloat16 \[16\], got Float \[16\]"),
}


@gpu
@pytest.mark.parametrize("case", list(GEMM_BAD_CALLS))
def test_gemm_bad_calls_raise_what_is_wrong(case, gen):
    ops, why = cuda_ext.load()
    assert ops is not None, why
    gemv = _gemv_args(gen, k=264)  # K = 264: 33 GPTQ word rows, 36 in mma order (K rounded up to 32), 3 stages
    args = {"x": gemv["x"], "qweight": mma_order(gemv["qweight"]), "qzeros": gemv["qzeros"], "scales": gemv["scales"],
            "bias": None, "group_size": 128, "splits": 1, "stages_per_block": 3, "ws": gemv["ws"], "cnt": gemv["cnt"]}
    assert ops.wna16_gemm(**args).shape == (2, 128)
    change, message = GEMM_BAD_CALLS[case]
    with pytest.raises(RuntimeError, match=message):
        ops.wna16_gemm(**(args | change(args)))


@gpu
def test_wgmma_reads_the_mma_order_on_sm90_only(gen):
    """The wgmma GEMM takes the mma.sync GEMM's reordered words [K32/8, N] (not the GPTQ layout), on an sm_90 GPU
    only."""
    ops, why = cuda_ext.load()
    assert ops is not None, why
    gemv = _gemv_args(gen, k=264)
    args = {"x": gemv["x"], "qweight": mma_order(gemv["qweight"]), "qzeros": gemv["qzeros"], "scales": gemv["scales"],
            "bias": None, "group_size": 128, "splits": 1, "stages_per_block": 5, "ws": gemv["ws"], "cnt": gemv["cnt"],
            "block_rows": 128}
    if torch.cuda.get_device_capability(DEVICE) != (9, 0):
        with pytest.raises(RuntimeError, match="wna16_wgmma needs an sm_90 GPU, got compute capability"):
            ops.wna16_wgmma(**args)
        return
    assert ops.wna16_wgmma(**args).shape == (2, 128)
    with pytest.raises(RuntimeError,
                       match=r"qweight must be int32 \[K32/8, N\] = \[36, 128\] \(4-bit\), got Int \[33, 128\]"):
        ops.wna16_wgmma(**(args | {"qweight": gemv["qweight"]}))
    with pytest.raises(RuntimeError, match="wna16_wgmma runs blocks of 128 or 256 rows, got block_rows = 64"):
        ops.wna16_wgmma(**(args | {"block_rows": 64}))


@pytest.mark.parametrize("rows", [128, 256])
@pytest.mark.parametrize("m,n,k,act", [(300, 4160, 1536, True), (129, 576, 4160, False), (1000, 1536, 576, True)])
@gpu
def test_wgmma_block_heights_match_reference(rows, m, n, k, act, gen, monkeypatch):
    """Both block heights at ragged M, N and K, whichever the selection rule would pick (K split where the tiles
    are few)."""
    cls = _cls("cuda_wna16_wgmma")
    layer = wna16_layer(k, n, 4, 128, False, act, bf16, bias=True, gen=gen)
    _skip_unless_implemented(cls.name, layer)
    monkeypatch.setattr(cls, "tile_rows", lambda self, _m: rows)
    x = torch.randn(m, k, generator=gen).to(bf16).to(DEVICE)
    assert check(layer, cls, x) is not None
    assert_workspace_clean()


@pytest.mark.parametrize("m,n,want", [(256, 6144, 128), (1024, 6144, 128), (512, 6144, 256), (256, 4096, 128),
                                      (512, 4096, 128), (1024, 4096, 256), (256, 28672, 256), (512, 28672, 128),
                                      (1024, 28672, 256), (64, 28672, 128), (129, 576, 128)])
def test_wgmma_block_height_rule(m, n, want):
    """256-row blocks unless their last wave leaves more than half of an H100's 132 multiprocessors idle: the
    H100 sweep's faster height on the 8B shapes (wgmma_tiles_h100.json)."""
    assert wgmma_tile_rows(m, n, 132) == want


@gpu
def test_permute_cols_rejects_a_short_perm(gen):
    ops, why = cuda_ext.load()
    assert ops is not None, why
    args = _gemv_args(gen)
    with pytest.raises(RuntimeError, match=r"perm must be int32 \[K\] = \[256\], got Int \[248\]"):
        ops.permute_cols(args["x"], args["perm"][:-8])


@pytest.mark.parametrize("tiles,steps,slots,want", [(32, 112, 396, 12), (224, 32, 396, 4), (48, 32, 132, 4),
                                                     (32, 112, 264, 8), (48, 32, 396, 8), (224, 32, 264, 4)])
def test_k_slices_keep_short_slices_unless_longer_ones_fit_one_wave(tiles, steps, slots, want):
    """NF4's rule (SHORT_STEPS = 8, up to 14 steps staged): the H100 sweep's fastest counts on the 8B shapes."""
    assert k_slices(tiles, steps, 14, slots, short_steps=8)[0] == want


def test_layers_it_cannot_serve_are_refused_with_a_reason(gen):
    gemv = _cls("cuda_wna16_gemv")
    for layer, words in [(wna16_layer(256, 64, 8, 64, True, False, bf16, False, gen), "8-bit"),
                         (wna16_layer(256, 64, 4, 16, True, False, bf16, False, gen), "group size 16"),
                         (wna16_layer(256, 64, 4, 64, True, False, torch.float32, False, gen), "float32")]:
        ok, reason = gemv.can_implement(layer, layer.quant_method, DEVICE)
        assert not ok and words in reason
    assert gemv.bucket_refusal(BUCKETS[0]) == ""  # m<=8
    assert "M <= 8" in gemv.bucket_refusal(BUCKETS[1])
    gemm = _cls("cuda_wna16_gemm")  # where there is no wgmma GEMM (ahead of it in the list, sm_90 only)
    assert [gemm.bucket_refusal(b) == "" for b in BUCKETS] == [False, True, True, True, True, False, False]
    assert "8 < M <= 256" in gemm.bucket_refusal(BUCKETS[-1])
    wgmma = _cls("cuda_wna16_wgmma")
    assert [wgmma.bucket_refusal(b) == "" for b in BUCKETS] == [False, False, False, True, True, True, False]
    assert "32 < M <= 1024" in wgmma.bucket_refusal(BUCKETS[-1])


def test_the_cuda_sources_ship_in_the_wheel():
    """quantkit/csrc (a link to the top-level csrc/) holds the sources, and package-data puts every file in it into
    the wheel, so that an installed (not editable) quantkit can still build its kernels on first use."""
    from fnmatch import fnmatch
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((cuda_ext.CSRC.parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["quantkit"]
    assert all((cuda_ext.CSRC / name).is_file() for name in cuda_ext.SOURCES)
    for path in cuda_ext.CSRC.iterdir():
        assert any(fnmatch(f"csrc/{path.name}", g) for g in globs), f"{path.name} would be left out of the wheel"


def test_build_reports_why_without_cuda(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_result", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ops, reason = cuda_ext.load()
    assert ops is None and "no CUDA device" in reason


def test_build_reports_missing_nvcc(monkeypatch):
    from torch.utils import cpp_extension
    monkeypatch.setattr(cuda_ext, "_result", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/nonexistent-cuda")
    ops, reason = cuda_ext.load()
    assert ops is None and "nvcc not found" in reason


def test_build_runs_once_across_threads(monkeypatch):
    calls = []

    def build():
        calls.append(1)
        return None, "nvcc not found (test)"
    monkeypatch.setattr(cuda_ext, "_result", None)
    monkeypatch.setattr(cuda_ext, "_build", build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cuda_ext.load())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [(None, "nvcc not found (test)")] * 8


def test_failed_build_falls_back_with_its_reason(gen, monkeypatch, caplog):
    """A failed build is a refusal: the reason reaches selection and the next kernel serves (on a GPU the whole
    plan is checked, on CPU the refusal itself)."""
    monkeypatch.setattr(cuda_ext, "_result", (None, "nvcc not found (test)"))
    monkeypatch.setattr(select, "_logged", set())
    with caplog.at_level(logging.INFO, logger="quantkit.kernels.select"):
        layer = wna16_layer(256, 64, 4, 64, True, False, bf16, False, gen)
    cls, reason = select._refusal("cuda_wna16_gemv", layer, layer.quant_method, torch.device("cuda"), BUCKETS[0])
    assert reason == "nvcc not found (test)"
    if DEVICE.type == "cuda":
        assert layer.quant_method.kernels.names()[0] == "triton_wna16_splitk"
        assert "cuda_wna16_gemv: nvcc not found (test)" in caplog.text


@pytest.mark.parametrize("tiles,slots,want", [(96, 264, 1), (128, 264, 1), (64, 264, 4), (224, 132, 1)])
def test_k_slices_split_only_where_min_slices_fit(tiles, slots, want):
    """The wgmma GEMM's floor (MIN_SLICES = 3), H100 sweep shapes at K = 4096 (64 stages): 96 or 128 tiles of
    128 rows fit 2 slices each in 264 slots and stay whole; 64 tiles fit 4 and split 4 ways."""
    assert k_slices(tiles, 64, 64, slots, min_slices=3) == (want, 64 // want)
    assert k_slices(tiles, 64, 64, slots)[0] == min(64, max(1, slots // tiles))


@pytest.mark.parametrize("tiles,steps,max_steps,slots", [(16, 448, 32, 264), (24, 128, 32, 264), (112, 128, 32, 264),
                                                         (48, 32, 8, 132), (1, 18, 32, 264), (300, 5, 8, 264)])
def test_k_slices_fill_one_wave_within_the_staging_limit(tiles, steps, max_steps, slots):
    slices, per = k_slices(tiles, steps, max_steps, slots)
    assert per <= max_steps and (slices - 1) * per < steps <= slices * per  # each step in exactly one slice
    if tiles * slices > slots:  # past one wave only when the staging limit forces that many slices
        assert slices == -(-steps // max_steps)
    else:  # the finest cut that still fits one wave
        assert per == 1 or tiles * -(-steps // (per - 1)) > slots
