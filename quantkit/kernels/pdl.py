"""Programmatic dependent launch (PDL; Hopper and later). A decode step is a chain of short kernels, each of which
used to wait for the one before it to finish before it could even launch. With PDL a kernel launches while its
predecessor is finishing and waits (griddepcontrol.wait) only where it first needs the predecessor's output: the
launch gap and ramp overlap the previous kernel's tail, and the 4-bit GEMVs (csrc/) stream their first weights and
scales before they wait.

Only launches of up to MAX_TOKENS rows (decode) use it. Every kernel launched with PDL must wait before it reads an
activation or writes anything (a buffer it writes may still be read by its predecessor); only weights, which
nothing writes during inference, may be read before. Our Triton kernels wait first thing (`wait_for_inputs`), the
csrc/ kernels after their weight prefetch. Kernels not launched with PDL (torch's, cuBLAS) keep plain stream
order, so mixing them in is safe: there is just no overlap at those edges.

On by default where the device supports it; `set_enabled(False)` turns it off, e.g. for a side-by-side benchmark."""
from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

from quantkit.kernels import cuda_ext
from quantkit.kernels.triton_common import interpreting

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    TRITON_PDL = True
except ImportError:  # a Triton without grid dependency control: our Triton kernels launch plainly
    TRITON_PDL = False

_enabled = True
# Launches of more tokens go plainly (the csrc/ kernels get the same limit: sync_cuda_kernels). H100, 8B shapes,
# the same kernels with and without PDL in one run: at M <= 16, where a launch is a few microseconds, PDL gained
# 2-5% for W8A8 and 15-24% at M = 1 for the 4-bit GEMVs (benchmarks/results/linear_kernels_h100.json); with PDL at
# every M, the Triton INT8 GEMM ran 5-14% slower at M = 256 and 1024 and FP8 (activation quant, then cuBLAS) 5%
# slower at M = 4096 (linear_kernels_w8a8_pdl_h100.json), so larger launches stay plain.
MAX_TOKENS = 64


@cache
def _supported(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """Whether kernels launched on `device` use PDL."""
    return _enabled and device.type == "cuda" and not interpreting() and _supported(device)


def set_enabled(on: bool) -> None:
    """Turns PDL on (where supported) or off for every later launch, Triton and csrc/ alike. Not inside a CUDA-graph
    capture: a captured graph keeps the launches it recorded."""
    global _enabled
    _enabled = on
    if cuda_ext.loaded():
        sync_cuda_kernels()


def sync_cuda_kernels() -> None:
    """Tells the loaded csrc/ extension up to how many rows of M it launches with PDL (one setting for the process:
    the current device decides)."""
    on = enabled(torch.device("cuda", torch.cuda.current_device()))
    torch.ops.quantkit.set_programmatic_launch(MAX_TOKENS if on else 0)


def launch_args(device: torch.device, tokens: int) -> dict:
    """Keyword arguments for a Triton launch over `tokens` rows of a kernel that calls `wait_for_inputs(PDL)`."""
    on = TRITON_PDL and tokens <= MAX_TOKENS and enabled(device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


if TRITON_PDL:
    @triton.jit
    def wait_for_inputs(PDL: tl.constexpr):
        """In a Triton kernel launched with `launch_args`, before its first read of anything but weights: with PDL,
        wait for the previous kernel's output, then let the next kernel launch."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
else:
    @triton.jit
    def wait_for_inputs(PDL: tl.constexpr):
        """Without grid dependency control in Triton, kernels launch plainly and there is nothing to wait for."""
        pass
