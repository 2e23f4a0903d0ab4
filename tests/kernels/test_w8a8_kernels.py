"""FP8 and INT8 W8A8: the fused per-token activation quant and the 8-bit GEMM against the torch reference."""
from __future__ import annotations

import pytest
import torch

from quantkit.quant.w8a8 import FP8, INT8, quantize_dynamic
from tests.kernels.conftest import DEVICE, assert_workspace_clean, check, gpu, w8a8_layer

CASES = [  # (M, N, K, fp8, static input scale, dtype)
    (1, 576, 576, True, False, torch.bfloat16),
    (9, 200, 1536, True, True, torch.float16),
    (3, 1536, 320, False, False, torch.bfloat16),
    (20, 96, 576, False, True, torch.bfloat16),
    (2, 64, 1536, False, False, torch.float16),  # one output tile: K split in 6 slices on the interpreter
    (5, 100, 1100, True, False, torch.bfloat16),  # 4 slices, the last one short
    (1, 64, 1100, False, False, torch.float16),  # one row, quantized inside the split GEMM
]


def _kernels(fp8: bool):
    from quantkit.kernels import triton_w8a8
    kernels = [triton_w8a8.TritonW8A8, triton_w8a8.TritonW8A8SplitK]
    return kernels + [triton_w8a8.ScaledMMFP8] if fp8 and DEVICE.type == "cuda" else kernels


# A Triton block holds up to 16384 values; widths that are multiples of 8 take the cluster kernel on Hopper
@pytest.mark.parametrize("k", [700, 16500, 8200, 16504], ids=["one_block", "two_blocks", "cluster", "cluster_wide"])
@pytest.mark.parametrize("qtype", [FP8, INT8], ids=["fp8", "int8"])
def test_quant_kernel_matches_reference(qtype, k, gen):
    """Scales bit for bit and code values equal to the torch reference on the same device (+0 and -0 alike: on the
    H100 the kernel's cast writes +0 where torch writes -0). Values on rounding ties (x / scale = 76 between the
    E4M3 values 72 and 80, 63.5 between two INT8 codes) catch a scale that is off by an ulp: on CUDA, torch divided
    by a Python float as a multiply by its reciprocal, and 0.1% of FP8 codes differed from the kernel's."""
    from quantkit.kernels import cuda_row_quant
    from quantkit.kernels.triton_w8a8 import quantize_per_token
    if k % 8 == 0 and DEVICE.type == "cuda" and torch.cuda.get_device_capability() >= (9, 0):
        assert cuda_row_quant.serves(torch.empty(5, k, dtype=torch.bfloat16, device=DEVICE), k)
    x = (torch.randn(5, k, generator=gen) * torch.rand(5, 1, generator=gen) * 10).to(torch.bfloat16)
    x[1, -1] = 1000.0  # the amax in the last block
    x[2] = 0  # an all-zero row: the scale floor, codes 0
    x[3, :6] = torch.tensor([448.0, 76.0, -76.0, 27.0, -1e-4, 1e-4])  # amax 448: scale 1, ties at 76 and 27
    x[4, :4] = torch.tensor([127.0, 63.5, -63.5, 0.5])  # INT8 scale 1, ties at 63.5 and 0.5
    ref_q, ref_s = quantize_dynamic(x.to(DEVICE).float(), qtype)
    q, s = quantize_per_token(x.to(DEVICE), qtype.dtype)
    assert torch.equal(s, ref_s), f"scales {s.flatten().tolist()} != reference {ref_s.flatten().tolist()}"
    got, want = qtype.to_float(q), qtype.to_float(ref_q)
    differ = (got != want).nonzero().tolist()
    assert not differ, "codes differ: " + "; ".join(
        f"x={x[i, j].item()!r} scale={s[i, 0].item()!r} got {got[i, j].item()!r} want {want[i, j].item()!r}"
        for i, j in differ[:6])


@pytest.mark.parametrize("m,n,k,fp8,static,dtype", CASES)
def test_matches_reference(m, n, k, fp8, static, dtype, gen):
    layer = w8a8_layer(k, n, fp8, static, dtype, bias=True, gen=gen)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    for cls in _kernels(fp8):
        check(layer, cls, x)
        assert_workspace_clean()


def test_one_row_reaches_the_gemm_in_floats(gen):
    """The op before a dynamic W8A8 layer emits codes, except for one 16-bit row, which the split-K GEMM quantizes
    itself for free (quant/w8a8.py: input_quant_for); the torch reference takes codes at every M."""
    from quantkit.kernels.base import KernelPlan, TorchReferenceKernel
    from quantkit.kernels.triton_w8a8 import TritonW8A8SplitK
    layer = w8a8_layer(1100, 64, True, False, torch.bfloat16, bias=False, gen=gen)
    method = layer.quant_method
    method.kernels = KernelPlan([TritonW8A8SplitK(layer, method)], [])
    assert method.input_quant_for(1, torch.bfloat16) is None
    assert method.input_quant_for(2, torch.bfloat16) == method.input_quant == FP8
    assert method.input_quant_for(1, torch.float32) == FP8
    method.kernels = KernelPlan([TorchReferenceKernel(layer, method)], [])
    assert method.input_quant_for(1, torch.bfloat16) == FP8


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "int8"])
def test_row_quantized_inside_the_gemm_equals_the_quant_kernel(fp8, gen):
    """At M = 1 the GEMM quantizes the row itself: the same codes and scale as quantize_per_token, so the same
    output bit for bit (a row whose amax sits in the last K slice, a split GEMM); longer rows are refused."""
    from quantkit.kernels.triton_w8a8 import FUSED_QUANT_MAX_K, TritonW8A8SplitK, quantize_per_token, scaled_gemm8
    layer = w8a8_layer(1100, 64, fp8, False, torch.bfloat16, bias=True, gen=gen)
    x = torch.randn(1, 1100, generator=gen).to(torch.bfloat16)
    x[0, -3] = 9.0
    x = x.to(DEVICE)
    kernel = TritonW8A8SplitK(layer, layer.quant_method)
    assert kernel.quantizes_inside(1, x.dtype) and not kernel.quantizes_inside(2, x.dtype)
    fused = scaled_gemm8(x, layer.weight, None, kernel.w_scale, layer.bias, x.dtype, split=True)
    q, s = quantize_per_token(x, layer.weight.dtype)
    assert torch.equal(fused, scaled_gemm8(q, layer.weight, s, kernel.w_scale, layer.bias, x.dtype, split=True))
    assert_workspace_clean()
    with pytest.raises(ValueError, match="one 16-bit row"):
        scaled_gemm8(torch.zeros(1, FUSED_QUANT_MAX_K + 1, dtype=torch.bfloat16, device=DEVICE), layer.weight, None,
                     kernel.w_scale, None, torch.bfloat16)


def test_large_activations_stay_finite(gen):
    layer = w8a8_layer(256, 64, True, False, torch.float16, bias=False, gen=gen)
    x = (torch.randn(3, 256, generator=gen) * 2e4).clamp(-6e4, 6e4).to(torch.float16).to(DEVICE)
    for cls in _kernels(True):
        check(layer, cls, x, bias=False)


GPU_SHAPES = [(1, 4096, 4096), (2, 576, 4160), (16, 6144, 4096), (17, 1536, 576), (64, 4160, 1536),
              (100, 576, 576), (256, 4096, 14336), (300, 1536, 4160), (1024, 4096, 4096), (4096, 576, 1536)]


@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "int8"])
@gpu
def test_gpu_sweep(m, n, k, fp8, gen):
    dtype = torch.float16 if m % 3 == 0 else torch.bfloat16
    layer = w8a8_layer(k, n, fp8, m % 2 == 0, dtype, bias=True, gen=gen)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    for cls in _kernels(fp8):
        check(layer, cls, x)
        assert_workspace_clean()
