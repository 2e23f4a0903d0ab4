"""The CUDA 4-bit GEMMs for M beyond the GEMV's decode sizes, split-K inside the launch where the tiles alone leave
multiprocessors idle, act-order layers on activations permuted by one gather launch:

- `CudaWNA16Gemm` (csrc/wna16_gemm.cu, sm_80+): a Marlin-class kernel, 16-64-row x 128-column tiles fed by a
  4-deep cp.async pipeline, dequantized in registers once per B fragment and used for every m16 tile of the block,
  mma.sync with fp32 accumulation. It reads its own copy of the weight, reordered once at load (`mma_order`):
  within each 32 rows of K the codes a lane feeds to two k16 mmas share one int32 word, so activations enter the
  tensor cores straight from shared memory (ldmatrix) with no per-element reordering.
- `CudaWNA16Wgmma` (csrc/wna16_wgmma.cu, sm_90a): for M in the hundreds and beyond, where mma.sync cannot keep up
  with cuBLAS's wgmma. It computes out^T = W x^T: the weight, dequantized in registers, is wgmma's A operand and the
  activations (one TMA copy per stage) its B operand in shared memory; 128 weight columns x 128 or 256 rows of M
  per block.

Both also multiply bitsandbytes NF4 / FP4 layers (`CudaNF4Gemm`, `CudaNF4Wgmma`): the codes go through a 16-entry
table in registers instead of the zero point, the absmax resolved at load is the per-group scale (`nf4_operands`).
Each layer's reordered copy is made once, however many of its kernels read it (`derived_once`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from quantkit.kernels import cuda_ext
from quantkit.kernels.base import LinearKernel
from quantkit.kernels.cuda_gemv import DRIVER_SMEM, cuda_refusal, k_slices, tiled_refusal, wna16_refusal
from quantkit.kernels.cuda_gemv import block_rows as gemv_block_rows
from quantkit.kernels.triton_common import check_2d, num_sms, splitk_workspace
from quantkit.quant import bnb_format
from quantkit.quant.nf4 import resolved_absmax

TILE_N = 128  # output columns per block, both GEMMs (csrc/kernels.h: kGemmTileN, kWgmmaTileN)


def mma_order(qweight: torch.Tensor, adjacent_pairs: bool = False) -> torch.Tensor:
    """GPTQ-layout 4-bit words [K/8, N] -> the GEMM's mma order [K32/8, N] (csrc/kernels.h): in each 32 rows of K,
    nibble a + 4 h of word row c holds row 2 c + 8 a + h, i.e. old word row a, nibble 2 c + h (with
    `adjacent_pairs`, the order of code-table layers: nibble 2 a + h). Padding rows (K up to a multiple of 32) hold
    code 0."""
    rows, n = qweight.shape
    words = F.pad(qweight.contiguous().long() & 0xFFFFFFFF, (0, 0, 0, -rows % 4)).view(-1, 4, n)
    out = torch.zeros_like(words)
    for c in range(4):
        for a in range(4):
            for h in range(2):
                to = 2 * a + h if adjacent_pairs else a + 4 * h
                out[:, c] |= ((words[:, a] >> (4 * (2 * c + h))) & 0xF) << (4 * to)
    out = out.view(-1, n)
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


@dataclass
class GemmOperands:
    """What both GEMMs multiply by: W[k, n] = scales[k // group, n] * (q[k, n] - zero) or * code_table[q[k, n]]."""
    qweight: torch.Tensor                   # int32 [K32/8, N], mma order (adjacent pairs with a code table)
    scales: torch.Tensor                    # [NG, N] activation dtype
    group_size: int
    qzeros: torch.Tensor | None = None      # int32 [NG, N/8] (integer codes)
    code_table: torch.Tensor | None = None  # [16] activation dtype


_DERIVED = WeakIdKeyDictionary()


def derived_once(source: torch.Tensor, make: Callable[[], GemmOperands]) -> GemmOperands:
    """`make()`, computed once per source weight however many kernels of a layer read it."""
    if source not in _DERIVED:
        _DERIVED[source] = make()
    return _DERIVED[source]


def wna16_operands(layer: nn.Module, method) -> GemmOperands:
    return derived_once(layer.qweight, lambda: GemmOperands(mma_order(layer.qweight), layer.scales,
                                                            method.group_size, qzeros=layer.qzeros))


def nf4_operands(layer: nn.Module, method) -> GemmOperands:
    """bitsandbytes 4-bit (quant/nf4.py) as the GEMMs' operands: the codes in mma order, the absmax resolved
    through both levels and rounded to the activation dtype as scales [K/B, N] (group = blocksize), the code in that
    dtype. Rounded twice (code and absmax to 16 bits, then their product) against the reference's once: within
    the dtype's bound (tests/kernels/test_cuda_kernels.py)."""
    c, dtype = method.config, method.params_dtype

    def make() -> GemmOperands:
        packed = layer.weight_packed  # [N, K/2], the even k in the high nibble
        gptq_words = ((packed << 4) | (packed >> 4)).view(torch.int32)  # [N, K/8], k % 8 = nibble (LSB first)
        scales = resolved_absmax(layer, c).t().to(dtype).contiguous()
        return GemmOperands(mma_order(gptq_words.t(), adjacent_pairs=True), scales, c.blocksize,
                            code_table=bnb_format.code4(c.quant_type, packed.device).to(dtype))
    return derived_once(layer.weight_packed, make)


def block_rows(m: int) -> int:
    """Rows of M per block at M = m (csrc/kernels.h: wna16_gemm_rows): the GEMV's, but at least one m16 tile."""
    return max(16, gemv_block_rows(m, 64))


def wgmma_tile_rows(m: int, n: int, sms: int) -> int:
    """Rows of M per wgmma block: 256 (one block per multiprocessor; each weight fragment serves twice the rows)
    unless its grid's last wave would leave more than half the multiprocessors idle, then 128 (two per
    multiprocessor, and a lone one runs faster than half a pair). H100, AWQ, 8B shapes
    (benchmarks/results/wgmma_tiles_h100.json): 6144 x 4096 at M = 1024 (192 tiles of 256, a last wave of 60)
    0.89x bf16 against 0.79x; 28672 x 4096 at M = 256 (224 tiles, a last wave of 92) 0.93x against 0.90x."""
    if m <= 128:
        return 128
    last = -(-n // TILE_N) * -(-m // 256) % sms
    return 256 if last == 0 or 2 * last >= sms else 128


class _TiledWNA16(LinearKernel):
    """What both GEMMs share: the refusals, the operands, the launch geometry, K slices per M cached, and the
    call."""
    format = "wna16"
    STAGE_K: int                    # K per pipeline stage (csrc/kernels.h); K slices are whole stages
    TILE_ROWS: tuple[int, ...]      # the block heights (rows of M) the kernel has
    MIN_SLICES = 1                  # split K only where at least this many slices of every tile run at once

    @classmethod
    def layer_refusal(cls, layer: nn.Module, method) -> str:
        return wna16_refusal(layer, method)

    @classmethod
    def can_implement(cls, layer: nn.Module, method, device: torch.device):
        reason = cls.layer_refusal(layer, method) or cuda_refusal(device)
        return not reason, reason

    @staticmethod
    def operands(layer: nn.Module, method) -> GemmOperands:
        return wna16_operands(layer, method)

    @staticmethod
    def input_perm(layer: nn.Module) -> torch.Tensor | None:
        """The activation gather an act-order layer still needs (read per call: folding drops it)."""
        return layer.perm

    def __init__(self, layer: nn.Module, method) -> None:
        super().__init__(layer, method)
        cuda_ext.load()
        self.ops = self.operands(layer, method)
        self.device = device = self.ops.qweight.device
        self.n, self.stages, self.sms = layer.output_size, -(-layer.input_size // self.STAGE_K), num_sms(device)
        self._splits: dict[int, tuple[int, int]] = {}
        # Split launches have at most as many tiles as places (sized here, not in a capture).
        places = {rows: self.blocks_per_sm(rows) * self.sms for rows in self.TILE_ROWS}
        self.max_tiles = max(places.values())
        splitk_workspace(device, max(p * rows for rows, p in places.items()) * TILE_N, self.max_tiles)

    def tile_rows(self, m: int) -> int:
        """Rows of M per block at M = m."""
        raise NotImplementedError

    def blocks_per_sm(self, rows: int) -> int:
        """Blocks of `rows` rows one multiprocessor holds."""
        raise NotImplementedError

    def split(self, m: int) -> tuple[int, int]:
        """(K slices, stages per slice) at M = m: as many slices as let every block run at once (for the wgmma GEMM
        a floor of 8 or 16 stages per slice measured no faster on an H100), none where fewer than MIN_SLICES
        would fit."""
        if m not in self._splits:
            rows = self.tile_rows(m)
            tiles = -(-self.n // TILE_N) * -(-m // rows)
            self._splits[m] = k_slices(tiles, self.stages, self.stages, self.sms * self.blocks_per_sm(rows),
                                       min_slices=self.MIN_SLICES)
        return self._splits[m]

    def gemm(self, x: torch.Tensor, bias: torch.Tensor | None, splits: int, per: int, ws: torch.Tensor,
             cnt: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = check_2d(x, layer.input_size)
        perm = self.input_perm(layer)
        if perm is not None:
            x2 = torch.ops.quantkit.permute_cols(x2, perm)
        elif not x2.is_contiguous() or x2.data_ptr() % 16:  # rows are staged by 16-byte copies
            x2 = x2.clone(memory_format=torch.contiguous_format)
        m = x2.shape[0]
        splits, per = self.split(m)
        ws, cnt = splitk_workspace(x2.device, m * self.n if splits > 1 else 0, self.max_tiles)
        return self.gemm(x2, bias, splits, per, ws, cnt).view(*x.shape[:-1], -1)


class CudaWNA16Gemm(_TiledWNA16):
    """4-bit WNA16 (GPTQ incl. act-order, AWQ, RTN, compressed-tensors) at any M, on mma.sync."""
    name = "cuda_wna16_gemm"
    STAGE_K, TILE_ROWS = 128, (16, 32, 64)
    # H100, 8B shapes (benchmarks/results/linear_kernels_gemm_h100.json): 1.89x bf16 at M = 16 against the GEMV's
    # 1.63x, 1.48x at M = 32 against 1.06x (H200, linear_kernels.json: 1.45x against 1.25x at M = 16; at M = 8
    # the two were even); beyond 256 rows dequantize-then-cuBLAS (0.69x at M = 1024 against 0.39x: mma.sync and
    # the in-register dequant cannot keep up with cuBLAS's wgmma). On sm_90 the wgmma GEMM, ahead of this one in
    # the priority list, takes M > 32.
    M_RANGE, M_RANGE_WHY = (8, 256), "the GEMV is faster up to 8 rows, dequantize-then-cuBLAS beyond 256"

    def tile_rows(self, m: int) -> int:
        return block_rows(m)

    def blocks_per_sm(self, rows: int) -> int:
        """2 by registers (128), fewer where shared memory is short (an A100's 164 KB holds one 64-row block of
        105 KB, an H100's 228 KB two)."""
        props = torch.cuda.get_device_properties(self.device)
        smem = torch.ops.quantkit.wna16_gemm_smem_bytes(rows) + DRIVER_SMEM
        return max(1, min(2, props.shared_memory_per_multiprocessor // smem))

    def gemm(self, x, bias, splits, per, ws, cnt):
        o = self.ops
        return torch.ops.quantkit.wna16_gemm(x, o.qweight, o.qzeros, o.scales, bias, o.group_size, splits, per, ws,
                                             cnt, o.code_table)


class CudaWNA16Wgmma(_TiledWNA16):
    """4-bit WNA16 (GPTQ incl. act-order, AWQ, RTN, compressed-tensors) at any M, on Hopper's wgmma (sm_90 only)."""
    name = "cuda_wna16_wgmma"
    STAGE_K, TILE_ROWS = 64, (128, 256)
    # H100, 8B shapes, AWQ (benchmarks/results/linear_kernels_wgmma_h100.json): geomean over bf16 cuBLAS against
    # the mma.sync GEMM's, same run: 1.26x against 1.19x at M = 64, 1.11x against 0.71x at M = 128, 0.83x against
    # 0.49x at M = 256; against dequantize + cuBLAS 0.81x against 0.60x at M = 512, 0.88x against 0.75x at 1024,
    # 0.87x against 0.92x at 4096 (what bounds it, and what was tried: csrc/wna16_wgmma.cu).
    M_RANGE, M_RANGE_WHY = (32, 1024), "the mma.sync GEMM is faster up to 32 rows, dequantize-then-cuBLAS beyond 1024"

    @classmethod
    def can_implement(cls, layer: nn.Module, method, device: torch.device):
        ok, reason = super().can_implement(layer, method, device)
        if ok and torch.cuda.get_device_capability(device) != (9, 0):
            return False, "needs an sm_90 GPU (wgmma)"
        return ok, reason

    # H100, AWQ, 8B shapes, M = 256 / 512 / 1024, every block height and split side by side
    # (benchmarks/results/wgmma_tiles_h100.json): 2 K slices lost 6-20% wherever one slice per tile filled more
    # than a third of the block slots (4096 x 4096 at M = 512: 0.69x against 0.85x); 4 slices won where 128-row
    # tiles filled a quarter (4096 x 14336 at M = 256: 0.95x against 0.57x).
    MIN_SLICES = 3

    def tile_rows(self, m: int) -> int:
        return wgmma_tile_rows(m, self.n, self.sms)

    def blocks_per_sm(self, rows: int) -> int:
        """128-row blocks: 128 registers and 106 KB of shared memory, two per multiprocessor; 256-row blocks one."""
        return 2 if rows == 128 else 1

    def gemm(self, x, bias, splits, per, ws, cnt):
        o = self.ops
        return torch.ops.quantkit.wna16_wgmma(x, o.qweight, o.qzeros, o.scales, bias, o.group_size, splits, per, ws,
                                              cnt, self.tile_rows(x.shape[0]), o.code_table)


class _NF4Operands:
    """Turns a GEMM into its bitsandbytes 4-bit variant (mixed in ahead of it): NF4 / FP4 codes through the table."""
    format = "nf4"

    @classmethod
    def layer_refusal(cls, layer: nn.Module, method) -> str:
        return tiled_refusal(layer.input_size, layer.output_size, method.config.blocksize, method.params_dtype)

    @staticmethod
    def operands(layer: nn.Module, method) -> GemmOperands:
        return nf4_operands(layer, method)

    @staticmethod
    def input_perm(layer: nn.Module) -> None:
        return None


# The M ranges are the W4 GEMMs'. H100, 8B shapes, geomean over bf16 cuBLAS
# (benchmarks/results/linear_kernels_nf4_gemm_h100.json): mma.sync 1.71 / 1.66 / 1.45x at M = 8 / 16 / 32 against
# wgmma's 1.20 / 1.22 / 1.20x; wgmma 1.21 / 0.76 / 0.82x at 64 / 256 / 1024 against mma.sync's 1.08 / 0.43 / 0.39x
# and dequantize + cuBLAS's 0.37 / 0.41 / 0.72x; at 2048 / 4096 wgmma 0.84 / 0.82x against dequantize + cuBLAS's
# 0.82 / 0.92x. The table lookup costs the wgmma GEMM 8-13% against AWQ's integer codes (0.77 / 0.82x against
# 0.89 / 0.89x at M = 256 / 1024, one run: linear_kernels_nf4_vs_awq_h100.json).


class CudaNF4Gemm(_NF4Operands, CudaWNA16Gemm):
    """bitsandbytes NF4 / FP4 (double quant or not) on the mma.sync GEMM."""
    name = "cuda_nf4_gemm"


class CudaNF4Wgmma(_NF4Operands, CudaWNA16Wgmma):
    """bitsandbytes NF4 / FP4 (double quant or not) on Hopper's wgmma (sm_90 only)."""
    name = "cuda_nf4_wgmma"
