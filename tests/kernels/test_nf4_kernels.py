"""bitsandbytes NF4/FP4 (double quant or not): fused dequant-GEMM and dequantize-then-cuBLAS."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import DEVICE, assert_workspace_clean, check, gpu, nf4_layer

CASES = [  # (M, shard sizes, K, quant_type, double quant, dtype): nested groups straddle rows and shards
    (1, [96, 160], 576, "nf4", True, torch.bfloat16),
    (6, [200], 1536, "nf4", False, torch.float16),
    (17, [64, 64, 32], 256, "fp4", True, torch.bfloat16),
]


def _kernels():
    from quantkit.kernels.triton_nf4 import NF4DequantCublas, TritonNF4
    return [TritonNF4, NF4DequantCublas]


@pytest.mark.parametrize("m,sizes,k,quant_type,double,dtype", CASES)
def test_matches_reference(m, sizes, k, quant_type, double, dtype, gen):
    layer = nf4_layer(k, sizes, quant_type, double, dtype, bias=True, gen=gen)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    for cls in _kernels():
        check(layer, cls, x)
    assert_workspace_clean()


def test_dequantize_equals_reference(gen):
    """The Triton dequantization is the reference's fp32 weight, up to one rounding of the absmax (a GPU may fuse
    the nested multiply-add that the reference rounds twice)."""
    from quantkit.kernels.triton_nf4 import NF4Weights, nf4_dequantize
    from quantkit.quant.nf4 import dequantize_layer
    layer = nf4_layer(576, [130, 126], "nf4", True, torch.float32, bias=False, gen=gen)
    c = layer.quant_method.config
    w = nf4_dequantize(NF4Weights(layer, c.quant_type, c.blocksize, c.double_quant), torch.float32)
    torch.testing.assert_close(w, dequantize_layer(layer, c, torch.float32), rtol=3e-7, atol=0)


GPU_CASES = [(1, [4096], 4096), (2, [576], 4160), (16, [14336, 14336], 4096), (17, [1536], 576),
             (64, [4096], 4096), (100, [576, 64], 1536), (256, [4160], 576), (1024, [4096], 14336)]


@pytest.mark.parametrize("m,sizes,k", GPU_CASES)
@gpu
def test_gpu_sweep(m, sizes, k, gen):
    dtype = torch.float16 if m % 3 == 0 else torch.bfloat16
    layer = nf4_layer(k, sizes, "nf4", True, dtype, bias=True, gen=gen)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    for cls in _kernels():
        check(layer, cls, x)
    assert_workspace_clean()
