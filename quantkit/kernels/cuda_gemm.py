"""The CUDA W4A16 GEMMs for M beyond the GEMV's decode sizes, split-K inside the launch where the tiles alone leave
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

Both read the same reordered copy of the weight (`mma_ordered`), made once per layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from quantkit.kernels import cuda_ext
from quantkit.kernels.base import LinearKernel
from quantkit.kernels.cuda_gemv import DRIVER_SMEM, cuda_refusal, k_slices, wna16_refusal
from quantkit.kernels.cuda_gemv import block_rows as gemv_block_rows
from quantkit.kernels.triton_common import check_2d, num_sms, splitk_workspace

TILE_N = 128  # output columns per block, both GEMMs (csrc/kernels.h: kGemmTileN, kWgmmaTileN)


def mma_order(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ-layout 4-bit words [K/8, N] -> the GEMM's mma order [K32/8, N] (csrc/kernels.h): in each 32 rows of K,
    nibble a + 4 h of word row c holds row 2 c + 8 a + h, i.e. old word row a, nibble 2 c + h. Padding rows (K up
    to a multiple of 32) hold code 0."""
    rows, n = qweight.shape
    words = F.pad(qweight.long() & 0xFFFFFFFF, (0, 0, 0, -rows % 4)).view(-1, 4, n)
    out = torch.zeros_like(words)
    for c in range(4):
        for a in range(4):
            for h in range(2):
                out[:, c] |= ((words[:, a] >> (4 * (2 * c + h))) & 0xF) << (4 * (a + 4 * h))
    out = out.view(-1, n)
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


_MMA_ORDERED = WeakIdKeyDictionary()


def mma_ordered(qweight: torch.Tensor) -> torch.Tensor:
    """`mma_order(qweight)`, computed once per weight however many kernels of a layer read it."""
    if qweight not in _MMA_ORDERED:
        _MMA_ORDERED[qweight] = mma_order(qweight)
    return _MMA_ORDERED[qweight]


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
    """What both GEMMs share: the refusals, the reordered weight, the launch geometry, K slices per M cached, and
    the call."""
    format = "wna16"
    STAGE_K: int                    # K per pipeline stage (csrc/kernels.h); K slices are whole stages
    TILE_ROWS: tuple[int, ...]      # the block heights (rows of M) the kernel has
    MIN_SLICES = 1                  # split K only where at least this many slices of every tile run at once

    @classmethod
    def can_implement(cls, layer: nn.Module, method, device: torch.device):
        reason = wna16_refusal(layer, method) or cuda_refusal(device)
        return not reason, reason

    def __init__(self, layer: nn.Module, method) -> None:
        super().__init__(layer, method)
        cuda_ext.load()
        self.device = device = layer.qweight.device
        self.group_size = method.group_size
        self.qweight = mma_ordered(layer.qweight)
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

    def gemm(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, splits: int, per: int,
             ws: torch.Tensor, cnt: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = check_2d(x, layer.input_size)
        if layer.perm is not None:
            x2 = torch.ops.quantkit.permute_cols(x2, layer.perm)
        elif not x2.is_contiguous() or x2.data_ptr() % 16:  # rows are staged by 16-byte copies
            x2 = x2.clone(memory_format=torch.contiguous_format)
        m = x2.shape[0]
        splits, per = self.split(m)
        ws, cnt = splitk_workspace(x2.device, m * self.n if splits > 1 else 0, self.max_tiles)
        return self.gemm(layer, x2, bias, splits, per, ws, cnt).view(*x.shape[:-1], -1)


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

    def gemm(self, layer, x, bias, splits, per, ws, cnt):
        return torch.ops.quantkit.wna16_gemm(x, self.qweight, layer.qzeros, layer.scales, bias, self.group_size,
                                             splits, per, ws, cnt)


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

    def gemm(self, layer, x, bias, splits, per, ws, cnt):
        return torch.ops.quantkit.wna16_wgmma(x, self.qweight, layer.qzeros, layer.scales, bias, self.group_size,
                                              splits, per, ws, cnt, self.tile_rows(x.shape[0]))
