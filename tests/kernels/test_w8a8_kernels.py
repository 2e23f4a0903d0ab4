"""FP8 and INT8 W8A8: the fused per-token activation quant and the 8-bit GEMM against the torch reference."""
from __future__ import annotations

import pytest
import torch

from quantkit.quant.w8a8 import FP8, INT8, quantize_dynamic
from tests.kernels.conftest import DEVICE, check, gpu, w8a8_layer

CASES = [  # (M, N, K, fp8, static input scale, dtype)
    (1, 576, 576, True, False, torch.bfloat16),
    (9, 200, 1536, True, True, torch.float16),
    (3, 1536, 320, False, False, torch.bfloat16),
    (20, 96, 576, False, True, torch.bfloat16),
]


def _kernels(fp8: bool):
    from quantkit.kernels import triton_w8a8
    kernels = [triton_w8a8.TritonW8A8, triton_w8a8.TritonW8A8SplitK]
    return kernels + [triton_w8a8.ScaledMMFP8] if fp8 and DEVICE.type == "cuda" else kernels


@pytest.mark.parametrize("qtype", [FP8, INT8], ids=["fp8", "int8"])
def test_quant_kernel_matches_reference(qtype, gen):
    """Codes equal the reference's except where x / scale lands within float rounding of a rounding boundary."""
    from quantkit.kernels.triton_w8a8 import quantize_per_token
    x = (torch.randn(5, 700, generator=gen) * torch.rand(5, 1, generator=gen) * 10).to(torch.bfloat16)
    x[2] = 0  # an all-zero row: the scale floor, codes 0
    ref_q, ref_s = quantize_dynamic(x.float(), qtype)
    q, s = quantize_per_token(x.to(DEVICE), qtype.dtype)
    assert torch.equal(s.cpu(), ref_s)
    mismatch = (qtype.to_float(q.cpu()) != qtype.to_float(ref_q)).float().mean().item()
    assert mismatch < 1e-3


@pytest.mark.parametrize("m,n,k,fp8,static,dtype", CASES)
def test_matches_reference(m, n, k, fp8, static, dtype, gen):
    layer = w8a8_layer(k, n, fp8, static, dtype, bias=True, gen=gen)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    for cls in _kernels(fp8):
        check(layer, cls, x)


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
