"""Per-token dynamic activation quant on Hopper thread-block clusters (csrc/row_quant.cu): the quantizing
SiLU-and-mul (fused_ops.silu_and_mul) and a dynamic W8A8 Linear's own quant pass (triton_w8a8.quantize_per_token)
take it for a few long rows. Each row is cut over the blocks of one cluster, which meet on the row's amax through
distributed shared memory, so a few rows still spread over many multiprocessors; the Triton kernels hold a row in
one program, which is faster once the rows alone fill the device or a row is short. Elsewhere (CPU and the
interpreter, GPUs before sm_90, fp32 activations, widths not a multiple of 8, no csrc/ build, static scales) the
Triton kernels serve; they stay the reference the GPU tests hold this to."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch

from quantkit.kernels import cuda_ext
from quantkit.kernels.triton_common import interpreting, num_sms

MAX_CLUSTER = 8  # the portable cluster size
MAX_BLOCK_THREADS = 1024
# Where the cluster kernel is the faster one (H100, bf16, CUDA-graph timed, benchmarks/results/row_quant_h100.json):
# up to 64 rows of >= 8192 values read per row. SiLU-and-mul + FP8 at 14336: 3.6 / 4.0 / 5.8 us against Triton's
# 6.3 / 6.4 / 7.0 us at T = 1 / 16 / 64, but 15 against 12.7 us at 256 and 178 against 143 at 4096; plain quant of
# 14336-wide rows 3.0-3.7 against 4.4-4.6 us at T <= 64, of 4096-wide rows 2.6-2.8 against 1.7-1.9 us: a cluster
# launch costs about 1.1 us more than a plain one (the same kernel at one block per row: 2.8 against 1.7 us).
MAX_ROWS = 64
MIN_ROW_VALUES = 8192
_enabled = True


@contextmanager
def use_cuda_row_quant(on: bool) -> Iterator[None]:
    """Allow (True, the default) or forbid the cluster kernel for the calls inside the block (tests and benchmarks
    run the Triton kernels beside it)."""
    global _enabled
    previous, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = previous


@cache
def _has_clusters(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def cluster_size(rows: int, cols: int, device: torch.device) -> int:
    """Blocks per row: enough to put about one block on each multiprocessor (at 16 rows of 14336, 8 blocks per
    row: 3.9 us, 2 blocks: 4.7 us; at 64 rows, 2 blocks: 5.8 us, 8 blocks: 7.1 us), at most 1024 threads each."""
    least = -(-cols // (8 * MAX_BLOCK_THREADS))
    return max(least, min(MAX_CLUSTER, num_sms(device) // max(rows, 1)))


def serves(x2: torch.Tensor, cols: int) -> bool:
    """Whether the cluster kernel takes 16-bit rows `x2` [T, C] (or [T, 2C], gate | up, for SiLU-and-mul) to
    quantize to `cols` codes each: where it is the faster kernel (MAX_ROWS, MIN_ROW_VALUES) and its shapes fit."""
    return (_enabled and x2.is_cuda and not interpreting() and x2.shape[0] <= MAX_ROWS
            and x2.shape[1] >= MIN_ROW_VALUES and x2.dtype in (torch.bfloat16, torch.float16) and cols % 8 == 0
            and cols <= 8 * MAX_CLUSTER * MAX_BLOCK_THREADS and x2.stride(-1) == 1 and x2.stride(0) % 8 == 0
            and x2.data_ptr() % 16 == 0 and _has_clusters(x2.device) and cuda_ext.load()[0] is not None)


def quantize_rows(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, silu_mul: bool) -> None:
    """Fills codes q [T, C] (int8 or float8_e4m3fn) and fp32 scales (T values) from x2 [T, C] (or silu(gate) * up of
    x2 [T, 2C] = gate | up). Only where `serves` said yes."""
    torch.ops.quantkit.row_quant(x2, q, scale, silu_mul, cluster_size(x2.shape[0], q.shape[1], x2.device))
