"""W4A16 (and W2/W8) dequant-GEMM kernels against the torch reference of the WNA16 kernel format."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import DEVICE, assert_workspace_clean, check, gpu, wna16_layer

# (M, N, K, bits, group, sym, act_order, dtype): 576 and 1536 are not multiples of the 128/256 tiles, K = 576
# leaves a ragged last group at G = 128, N = 200 is not a multiple of any tile.
CASES = [
    (1, 576, 576, 4, 128, True, True, torch.bfloat16),
    (7, 1536, 256, 4, 32, False, False, torch.float16),
    (20, 200, 576, 4, 64, False, True, torch.bfloat16),
    (3, 96, 1536, 4, -1, True, False, torch.bfloat16),
    (5, 64, 320, 8, 64, True, True, torch.float16),
    (2, 128, 256, 2, 128, False, False, torch.float32),
    (1, 128, 512, 8, 64, False, True, torch.float16),  # M = 1 takes the split-K kernel's FMA path
    (1, 64, 1024, 2, 32, True, False, torch.float32),
]
KERNELS = ("TritonWNA16", "TritonWNA16SplitK", "WNA16DequantCublas")


def _kernels():
    from quantkit.kernels import triton_wna16
    return [getattr(triton_wna16, name) for name in KERNELS]


@pytest.mark.parametrize("m,n,k,bits,group,sym,act,dtype", CASES)
def test_matches_reference(m, n, k, bits, group, sym, act, dtype, gen):
    layer = wna16_layer(k, n, bits, group, sym, act, dtype, bias=True, gen=gen)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    for cls in _kernels():
        check(layer, cls, x)
    assert_workspace_clean()


def test_large_activations_stay_finite(gen):
    """fp16 activations near the top of their range: dequantization and accumulation stay in fp32."""
    layer = wna16_layer(256, 64, 4, 64, False, True, torch.float16, bias=False, gen=gen, scale=1e-4)
    x = (torch.randn(4, 256, generator=gen) * 2e4).clamp(-6e4, 6e4).to(torch.float16).to(DEVICE)
    for cls in _kernels():
        check(layer, cls, x, bias=False)


def test_bad_bits_refused(gen):
    from quantkit.kernels.triton_wna16 import TritonWNA16
    layer = wna16_layer(96, 64, 3, 32, True, False, torch.bfloat16, bias=False, gen=gen)
    ok, reason = TritonWNA16.can_implement(layer, layer.quant_method, DEVICE)
    assert not ok and "3-bit" in reason


GPU_CASES = [(m, n, k, g, sym, act) for m, (n, k), g, sym, act in [
    (1, (4096, 4096), 128, True, True), (1, (576, 4160), 32, False, False), (2, (1536, 576), -1, True, False),
    (15, (4160, 1536), 64, False, True), (16, (6144, 4096), 128, False, False), (17, (576, 576), 128, True, True),
    (33, (1536, 4160), -1, False, True), (64, (4096, 4096), 128, True, False), (100, (576, 1536), 32, True, True),
    (255, (4160, 576), 64, True, False), (256, (4096, 4096), 128, False, True), (300, (1536, 1536), 128, False, False),
    (1024, (4096, 4160), 128, True, True), (4096, (576, 576), 64, False, False)]]


@pytest.mark.parametrize("m,n,k,group,sym,act", GPU_CASES)
@gpu
def test_gpu_sweep(m, n, k, group, sym, act, gen):
    dtype = torch.float16 if m % 3 == 0 else torch.bfloat16
    layer = wna16_layer(k, n, 4, group, sym, act, dtype, bias=True, gen=gen)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    for cls in _kernels():
        check(layer, cls, x)
    assert_workspace_clean()
