"""The CUDA W4A16 GEMM (csrc/wna16_gemm.cu) for M beyond the GEMV's decode sizes: a Marlin-class kernel, 64-row x
128-column tiles fed by a 4-deep cp.async pipeline, dequantized in registers once per B fragment and used for every
m16 tile of the block, fp32 accumulation on the tensor cores, split-K inside the launch where the tiles alone
leave multiprocessors idle.

It reads its own copy of the weight, reordered once at load (`mma_order`): within each 32 rows of K the codes a
lane feeds to two k16 mmas share one int32 word, so activations enter the tensor cores straight from shared memory
(ldmatrix) with no per-element reordering. Act-order layers run on activations permuted by one gather launch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.kernels import cuda_ext
from quantkit.kernels.base import LinearKernel
from quantkit.kernels.cuda_gemv import DRIVER_SMEM, cuda_refusal, k_slices, wna16_refusal
from quantkit.kernels.cuda_gemv import block_rows as gemv_block_rows
from quantkit.kernels.triton_common import check_2d, num_sms, splitk_workspace

TILE_N = 128   # output columns per block (csrc/kernels.h: kGemmTileN)
STAGE_K = 128  # K per pipeline stage (kGemmStageK); K slices are whole stages
MAX_BLOCKS_PER_SM = 2  # the kernel's __launch_bounds__ (128 registers)


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


def block_rows(m: int) -> int:
    """Rows of M per block at M = m (csrc/kernels.h: wna16_gemm_rows): the GEMV's, but at least one m16 tile."""
    return max(16, gemv_block_rows(m, 64))


class CudaWNA16Gemm(LinearKernel):
    """4-bit WNA16 (GPTQ incl. act-order, AWQ, RTN, compressed-tensors) at any M."""
    name = "cuda_wna16_gemm"
    format = "wna16"
    # H100, 8B shapes (benchmarks/results/linear_kernels_gemm_h100.json): 1.48x bf16 at M = 32 against the GEMV's
    # 1.06x; beyond 256 rows dequantize-then-cuBLAS (0.69x at M = 1024 against 0.39x: mma.sync and the in-register
    # dequant cannot keep up with cuBLAS's wgmma).
    M_RANGE, M_RANGE_WHY = (16, 256), "the GEMV is faster up to 16 rows, dequantize-then-cuBLAS beyond 256"

    @classmethod
    def can_implement(cls, layer: nn.Module, method, device: torch.device):
        reason = wna16_refusal(layer, method) or cuda_refusal(device)
        return not reason, reason

    def __init__(self, layer: nn.Module, method) -> None:
        super().__init__(layer, method)
        cuda_ext.load()
        self.device = device = layer.qweight.device
        self.qweight = mma_order(layer.qweight)
        self.group_size = method.group_size
        self.n, self.stages, self.sms = layer.output_size, -(-layer.input_size // STAGE_K), num_sms(device)
        self._splits: dict[int, tuple[int, int]] = {}
        # Split launches have at most half as many tiles as places: M x N <= SMs x 64 x 128 (sized here, not in a
        # capture).
        splitk_workspace(device, MAX_BLOCKS_PER_SM * self.sms * 64 * TILE_N, MAX_BLOCKS_PER_SM * self.sms)

    def split(self, m: int) -> tuple[int, int]:
        """(K slices, stages per slice) at M = m: as many slices as let every block run at once."""
        if m not in self._splits:
            rows = block_rows(m)
            tiles = -(-self.n // TILE_N) * -(-m // rows)
            self._splits[m] = k_slices(tiles, self.stages, self.stages, self.sms * self.blocks_per_sm(rows))
        return self._splits[m]

    def blocks_per_sm(self, rows: int) -> int:
        """Blocks of `rows` rows one multiprocessor holds: 2 by registers, fewer where shared memory is short (an
        A100's 164 KB holds one 64-row block of 105 KB, an H100's 228 KB two)."""
        props = torch.cuda.get_device_properties(self.device)
        smem = torch.ops.quantkit.wna16_gemm_smem_bytes(rows) + DRIVER_SMEM
        return max(1, min(MAX_BLOCKS_PER_SM, props.shared_memory_per_multiprocessor // smem))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = check_2d(x, layer.input_size)
        if layer.perm is not None:
            x2 = torch.ops.quantkit.permute_cols(x2, layer.perm)
        elif not x2.is_contiguous() or x2.data_ptr() % 16:  # rows are staged by 16-byte copies
            x2 = x2.clone(memory_format=torch.contiguous_format)
        m = x2.shape[0]
        splits, per = self.split(m)
        ws, cnt = splitk_workspace(x2.device, m * self.n if splits > 1 else 0, MAX_BLOCKS_PER_SM * self.sms)
        out = torch.ops.quantkit.wna16_gemm(x2, self.qweight, layer.qzeros, layer.scales, bias, self.group_size,
                                            splits, per, ws, cnt)
        return out.view(*x.shape[:-1], -1)
