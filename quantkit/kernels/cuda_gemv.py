"""CUDA 4-bit kernels for small and medium M (csrc/gemv.cu, built by cuda_ext): the decode case, where the Triton
kernels stay far from the memory-bandwidth floor (issue 7). They stream the 4-bit weights with vector loads and
multiply on the tensor cores (mma.sync, sm_80+). M is cut into blocks of 8-32 (NF4: 64) rows, each an output tile
of its own whose blocks run side by side, so a weight tile comes from HBM once and from L2 for the other row
blocks; K is cut across blocks, the slices meeting in the shared split-K workspace inside the one launch.

K slices: as many as let every block of the launch run at once (one wave of the blocks per multiprocessor that
the kernel's registers allow), or as few as the shared-memory staging allows when even that is more than one wave.
A launch a few blocks past a wave runs a second, nearly empty one: on an H100 the 4096x14336 GEMV at M = 1 took
15% longer with 17 slices (272 blocks for 264 places) than with 16 (benchmarks/gemv_slices.py sweeps the counts).
NF4 stages as many steps as the device's shared memory holds for its blocks per multiprocessor, and keeps slices
of 8 steps where no longer slice brings the launch into one wave.

Selection offers each the buckets of its M_RANGE (beyond it another kernel is faster, measured in
benchmarks/linear_kernels.py); forced (linear_kernel=...), they run M > MAX_M in MAX_M-row pieces."""
from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torch import nn

from quantkit.kernels import cuda_ext
from quantkit.kernels.base import LinearKernel
from quantkit.kernels.triton_common import check_2d, num_sms, splitk_workspace
from quantkit.kernels.triton_nf4 import NF4Weights

MAX_M = 64
_ACT_DTYPES = (torch.bfloat16, torch.float16)
DRIVER_SMEM = 1024  # shared memory the driver keeps per block (ncu: "Driver Shared Memory Per Block")


def block_rows(m: int, max_rows: int) -> int:
    """Rows of M per block at M = m (csrc/kernels.h: block_rows)."""
    return min(8 if m <= 8 else 16 if m <= 16 else 32 if m <= 32 else 64, max_rows)


def k_cut(steps: int, slices: int) -> tuple[int, int]:
    """(slices, K steps per slice) of `steps` cut into about `slices` equal slices, all but the last equally long
    (fewer slices where the equal length covers `steps` sooner)."""
    per = -(-steps // slices)
    return -(-steps // per), per


def k_slices(tiles: int, steps: int, max_steps: int, slots: int, short_steps: int | None = None,
             min_slices: int = 1) -> tuple[int, int]:
    """(slices, K steps per slice) for `tiles` output tiles of `steps` K steps when `slots` blocks run at once:
    the most slices whose blocks all fit in `slots` (none where fewer than `min_slices` would), but no slice
    longer than `max_steps` (the shared-memory staging). With `short_steps`, slices stay that short unless that
    spills past one wave where slices up to `max_steps` long would fit in one."""
    fit = slots // tiles  # slices of every tile that run at once
    wave = 1 if fit < min_slices else min(steps, max(1, fit))
    fewest = -(-steps // max_steps)
    if short_steps is not None:
        short = -(-steps // short_steps)
        if tiles * max(short, wave) <= slots or wave < fewest:
            fewest = max(fewest, short)
    return k_cut(steps, max(fewest, wave))


def cuda_refusal(device: torch.device) -> str:
    """Why the kernels of csrc/ cannot run on `device` ("" when they can)."""
    ops, reason = cuda_ext.load()
    if ops is None:
        return reason
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "needs compute capability >= 8.0 (mma.sync with bf16)"
    return ""


def tiled_refusal(k: int, n: int, group: int, dtype: torch.dtype) -> str:
    """Why the 4-bit CUDA kernels' tiling cannot take a [N, K] weight with scales per `group` of K in `dtype`
    ("" when it can): 16-byte copies of 8 codes or scales, scale steps of 32 K."""
    if k % 8 or n % 8:
        return f"K = {k} and N = {n} must be multiples of 8"
    if group < k and group % 32:
        return f"group size {group} is not a multiple of 32"
    if dtype not in _ACT_DTYPES:
        return f"{dtype} activations (bfloat16 / float16 only)"
    return ""


def wna16_refusal(layer: nn.Module, method) -> str:
    """Why the CUDA W4A16 kernels (GEMV and GEMM) cannot multiply `layer` ("" when they can)."""
    if method.bits != 4:
        return f"{method.bits}-bit weights (4-bit only)"
    return tiled_refusal(layer.input_size, layer.output_size, method.groups(layer.input_size)[0], layer.scales.dtype)


class _CudaGemv(LinearKernel):
    """What both GEMVs share: the refusals, the launch geometry fixed at load, and the M pieces."""
    TILE_N: ClassVar[int]   # output columns per block (csrc/kernels.h)
    STEP_K: ClassVar[int]   # K per warp step
    MAX_ROWS: ClassVar[int]   # the largest row block (csrc/kernels.h)
    # Blocks one multiprocessor holds, by row block: the __launch_bounds__ of csrc/gemv.cu.
    BLOCKS_PER_SM: ClassVar[dict[int, int]]
    SHORT_STEPS: ClassVar[int | None] = None  # slice length preferred where no longer slice fits one wave

    @classmethod
    def layer_refusal(cls, layer: nn.Module, method) -> str:
        """Why this kernel cannot multiply `layer` at all ("" when it can)."""
        raise NotImplementedError

    @classmethod
    def can_implement(cls, layer: nn.Module, method, device: torch.device):
        reason = cls.layer_refusal(layer, method) or cuda_refusal(device)
        return not reason, reason

    def __init__(self, layer: nn.Module, method) -> None:
        super().__init__(layer, method)
        cuda_ext.load()  # registers torch.ops.quantkit (a kernel keeps no handle: layers must stay deep-copyable)
        device = next(t.device for t in layer.parameters())
        self.n = layer.output_size
        steps, sms = -(-layer.input_size // self.STEP_K), num_sms(device)
        self.slices = [k_slices(self.tiles(m), steps, self.max_steps(block_rows(m, self.MAX_ROWS), device),
                                sms * self.BLOCKS_PER_SM[block_rows(m, self.MAX_ROWS)], self.SHORT_STEPS)
                       for m in range(1, MAX_M + 1)]  # by M - 1
        splitk_workspace(device, MAX_M * self.n, self.tiles(MAX_M))  # sized here, never inside a graph capture

    @classmethod
    def max_steps(cls, rows: int, device: torch.device) -> int:
        """The most K steps one block of `rows` rows of M stages (its slice's activations sit in shared memory)."""
        raise NotImplementedError

    def split(self, m: int) -> tuple[int, int]:
        """(K slices, K steps per slice) at M = m <= MAX_M."""
        return self.slices[m - 1]

    def tiles(self, m: int) -> int:
        """Output tiles (N tiles x row blocks) of a launch at M = m."""
        return -(-self.n // self.TILE_N) * -(-m // block_rows(m, self.MAX_ROWS))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = check_2d(x, layer.input_size)
        m = x2.shape[0]
        ws, cnt = splitk_workspace(x2.device, min(m, MAX_M) * self.n, self.tiles(min(m, MAX_M)))
        pieces = [self.gemv(layer, x2[i:i + MAX_M], bias, ws, cnt) for i in range(0, m, MAX_M)]
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return out.view(*x.shape[:-1], -1)

    def gemv(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, ws: torch.Tensor,
             cnt: torch.Tensor) -> torch.Tensor:
        """One launch for x [M <= MAX_M, K]."""
        raise NotImplementedError


class CudaWNA16Gemv(_CudaGemv):
    """4-bit WNA16 (GPTQ incl. act-order, AWQ, RTN, compressed-tensors). Act-order: up to GATHER_MAX_M rows (one
    row block) the kernel gathers x's permuted columns while it stages them, with no extra launch; beyond, every
    block would repeat a scalar gather of all its rows (at M = 16 on an H100 it made the 28672x4096 and 4096x14336
    GEMVs 1.5x and 2x slower), so a permute kernel writes x[:, perm] first and the GEMV runs as for AWQ."""
    name = "cuda_wna16_gemv"
    format = "wna16"
    TILE_N, STEP_K, MAX_ROWS = 256, 32, 32
    BLOCKS_PER_SM = {8: 2, 16: 2, 32: 2}
    GATHER_MAX_M = 8
    M_RANGE, M_RANGE_WHY = (0, 8), "the GEMM is faster beyond"

    @classmethod
    def layer_refusal(cls, layer, method) -> str:
        return wna16_refusal(layer, method)

    @classmethod
    def max_steps(cls, rows: int, device: torch.device) -> int:
        return 32  # csrc/bindings.cpp: wna16_gemv's slices stage at most 32 steps

    def __init__(self, layer: nn.Module, method) -> None:
        super().__init__(layer, method)
        self.group_size = method.group_size

    def gemv(self, layer, x, bias, ws, cnt):
        perm = layer.perm
        if perm is not None and x.shape[0] > self.GATHER_MAX_M:
            x, perm = torch.ops.quantkit.permute_cols(x, perm), None
        return torch.ops.quantkit.wna16_gemv(x, layer.qweight, layer.qzeros, layer.scales, perm, bias,
                                             self.group_size, *self.split(x.shape[0]), ws, cnt)


class CudaNF4Gemv(_CudaGemv):
    """bitsandbytes NF4 / FP4, double quant or not: the two-level absmax is resolved once per block and step."""
    name = "cuda_nf4_gemv"
    format = "nf4"
    TILE_N, STEP_K, MAX_ROWS = 128, 128, 64
    BLOCKS_PER_SM = {8: 2, 16: 2, 32: 2, 64: 1}
    # Past one wave, slices of 8 steps beat longer ones (H100 sweep, benchmarks/results/gemv_slices_nf4_h100.json:
    # 28672x4096 at M = 1 4 slices 12% faster than 3); within one wave the longer slices mostly win (6144x4096 at
    # M = 1: 5 slices of 7 steps 29% faster than 6 of 6), though 4096x14336 ran 11% faster in two waves of 7-step
    # slices than in one of 14.
    SHORT_STEPS = 8
    # H100, 8B shapes (benchmarks/results/linear_kernels_nf4_gemm_h100.json): 2.08x bf16 at M = 1 against the
    # mma.sync GEMM's 1.77x, 1.66x at M = 8 against 1.71x, 1.16x at M = 16 against 1.66x.
    M_RANGE, M_RANGE_WHY = (0, 8), "the GEMMs are faster beyond"

    @classmethod
    def layer_refusal(cls, layer, method) -> str:
        if method.config.blocksize % 64:
            return f"blocksize {method.config.blocksize} is not a multiple of 64"
        if method.params_dtype not in _ACT_DTYPES:
            return f"{method.params_dtype} activations (bfloat16 / float16 only)"
        return ""

    @classmethod
    def max_steps(cls, rows: int, device: torch.device) -> int:
        """The longest slice at which BLOCKS_PER_SM blocks still share a multiprocessor's shared memory (a fixed 8
        steps cut the 4096x14336 GEMV at M = 1 into 14 slices: 448 blocks for 396 places, 1.13 waves)."""
        return _nf4_max_steps(rows, cls.BLOCKS_PER_SM[rows], device.index or 0)

    def __init__(self, layer: nn.Module, method) -> None:
        super().__init__(layer, method)
        c = method.config
        self.weights = NF4Weights(layer, c.quant_type, c.blocksize, c.double_quant)

    def gemv(self, layer, x, bias, ws, cnt):
        w = self.weights
        return torch.ops.quantkit.nf4_gemv(x, w.packed, w.absmax, w.code, w.ncode, w.nabs, w.noff, w.row_group,
                                           w.row_block, bias, w.blocksize, *self.split(x.shape[0]), ws, cnt)


@functools.cache
def _nf4_max_steps(rows: int, blocks_per_sm: int, device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    budget = min(props.shared_memory_per_block_optin,
                 props.shared_memory_per_multiprocessor // blocks_per_sm - DRIVER_SMEM)
    steps = 1
    while torch.ops.quantkit.nf4_smem_bytes(rows, steps + 1) <= budget:
        steps += 1
    return steps
