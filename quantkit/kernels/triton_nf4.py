"""Triton kernels for the bitsandbytes 4-bit kernel format (quant/nf4.py: weight_packed uint8 [N, K/2] with the
even k in the high nibble, weight_absmax [N, K/B] uint8 codes (double quant) or fp32, nested code/absmax/offset).

- `nf4_matmul`: fused GEMM for small M. Each tile resolves its absmax through both levels in registers
  (absmax = nested_code[code] * nested_absmax[g] + nested_offset[g]), builds W = code4[q] * absmax in fp32, casts
  it to the activation dtype (as the reference does) and multiplies with fp32 accumulation; split-K partials
  are reduced inside the launch (triton_common.store_split_tile).
- `nf4_dequantize`: the same W as a dense [N, K] tensor, for cuBLAS at large M.
The nested group g of block (n, kb) is row_group[n] + (row_block[n] + kb) // 256, from two int32 [N] tables
derived once at load from the shard layout (quant/nf4.py group_index)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from quantkit.kernels.base import LinearKernel
from quantkit.kernels.pdl import launch_args, wait_for_inputs
from quantkit.kernels.triton_common import (TileConfig, check_2d, dot_dtype, split_for, splitk_workspace,
                                            store_split_tile)
from quantkit.quant import bnb_format as fmt


@triton.jit
def _lookup16(q, code_ptr):
    """code_ptr[q] for 4-bit codes q: a select tree over the 16 entries (scalar loads); a per-element gather
    from memory is several times slower."""
    low = (q & 1) != 0
    v0 = tl.where(low, tl.load(code_ptr + 1), tl.load(code_ptr + 0))
    v1 = tl.where(low, tl.load(code_ptr + 3), tl.load(code_ptr + 2))
    v2 = tl.where(low, tl.load(code_ptr + 5), tl.load(code_ptr + 4))
    v3 = tl.where(low, tl.load(code_ptr + 7), tl.load(code_ptr + 6))
    v4 = tl.where(low, tl.load(code_ptr + 9), tl.load(code_ptr + 8))
    v5 = tl.where(low, tl.load(code_ptr + 11), tl.load(code_ptr + 10))
    v6 = tl.where(low, tl.load(code_ptr + 13), tl.load(code_ptr + 12))
    v7 = tl.where(low, tl.load(code_ptr + 15), tl.load(code_ptr + 14))
    bit = (q & 2) != 0
    w0, w1 = tl.where(bit, v1, v0), tl.where(bit, v3, v2)
    w2, w3 = tl.where(bit, v5, v4), tl.where(bit, v7, v6)
    bit = (q & 4) != 0
    u0, u1 = tl.where(bit, w1, w0), tl.where(bit, w3, w2)
    return tl.where((q & 8) != 0, u1, u0)


@triton.jit
def _nf4_tile(w_ptr, am_ptr, code_ptr, ncode_ptr, nabs_ptr, noff_ptr, rowg_ptr, rowb_ptr, rn, n_ok, k0, K,
              DOUBLE: tl.constexpr, BLOCKSIZE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """W[rn, k0:k0+BK] as fp32 [BN, BK]."""
    NB: tl.constexpr = BK // BLOCKSIZE
    rb = k0 // 2 + tl.arange(0, BK // 2)
    byte = tl.load(w_ptr + rn[:, None] * (K // 2) + rb[None, :], mask=n_ok[:, None] & (rb < K // 2)[None, :],
                   other=0).to(tl.int32)
    q = tl.reshape(tl.join(byte >> 4, byte & 15), (BN, BK))
    vals = _lookup16(q, code_ptr)
    kb = k0 // BLOCKSIZE + tl.arange(0, NB)
    kb_ok = n_ok[:, None] & (kb < K // BLOCKSIZE)[None, :]
    am = tl.load(am_ptr + rn[:, None] * (K // BLOCKSIZE) + kb[None, :], mask=kb_ok, other=0)
    if DOUBLE:
        g = tl.load(rowg_ptr + rn, mask=n_ok, other=0)[:, None] + \
            (tl.load(rowb_ptr + rn, mask=n_ok, other=0)[:, None] + kb[None, :]) // 256
        scaled = tl.load(ncode_ptr + am.to(tl.int32)) * tl.load(nabs_ptr + g, mask=kb_ok, other=0.0)
        absmax = scaled + tl.load(noff_ptr + g, mask=kb_ok, other=0.0)
    else:
        absmax = am.to(tl.float32)
    return tl.reshape(tl.reshape(vals, (BN, NB, BLOCKSIZE)) * absmax[:, :, None], (BN, BK))


@triton.jit
def _nf4_gemm(x_ptr, w_ptr, am_ptr, code_ptr, ncode_ptr, nabs_ptr, noff_ptr, rowg_ptr, rowb_ptr, bias_ptr, out_ptr,
              ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_om, k_per_split, n_split,
              DOUBLE: tl.constexpr, BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    pid_m = tl.program_id(0) % tl.cdiv(M, BM)
    pid_n = tl.program_id(0) // tl.cdiv(M, BM)
    pid_k = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, min(K, k_start + k_per_split), BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & (rk < K)[None, :],
                    other=0.0)
        w = _nf4_tile(w_ptr, am_ptr, code_ptr, ncode_ptr, nabs_ptr, noff_ptr, rowg_ptr, rowb_ptr, rn, n_ok, k0, K,
                      DOUBLE, BLOCKSIZE, BN, BK)
        acc = tl.dot(x.to(DOT), tl.trans(w.to(x_ptr.dtype.element_ty).to(DOT)), acc)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    store_split_tile(acc, out_ptr + rm[:, None] * stride_om + rn[None, :], ws_ptr + rm[:, None] * N + rn[None, :],
                     cnt_ptr + tl.program_id(0), m_ok[:, None] & n_ok[None, :], n_split, SPLIT)


@triton.jit
def _nf4_dequant(w_ptr, am_ptr, code_ptr, ncode_ptr, nabs_ptr, noff_ptr, rowg_ptr, rowb_ptr, out_ptr, N, K,
                 DOUBLE: tl.constexpr, BLOCKSIZE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    rk = k0 + tl.arange(0, BK)
    n_ok = rn < N
    w = _nf4_tile(w_ptr, am_ptr, code_ptr, ncode_ptr, nabs_ptr, noff_ptr, rowg_ptr, rowb_ptr, rn, n_ok, k0, K,
                  DOUBLE, BLOCKSIZE, BN, BK)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_ok[:, None] & (rk < K)[None, :])


class NF4Weights:
    """The layer's kernel-format tensors plus the two per-row tables of the nested-group index."""

    def __init__(self, layer: nn.Module, quant_type: str, blocksize: int, double_quant: bool) -> None:
        n, k = layer.output_size, layer.input_size
        self.n, self.k, self.blocksize, self.double = n, k, blocksize, double_quant
        self.packed, self.absmax = layer.weight_packed, layer.weight_absmax
        self.code = fmt.code4(quant_type, self.packed.device)
        device = self.packed.device
        if double_quant:
            self.ncode, self.nabs, self.noff = (layer.weight_nested_code, layer.weight_nested_absmax,
                                                layer.weight_nested_offset)
            row_group, row_block, start = [], [], 0
            for rows, nb in zip(layer.output_sizes, layer.bnb_shard_blocks):
                local = torch.arange(rows, device=device, dtype=torch.int32) * (k // blocksize)
                row_block.append(local)
                row_group.append(torch.full_like(local, start))
                start += -(-nb // fmt.NESTED_BLOCKSIZE)
            self.row_group, self.row_block = torch.cat(row_group), torch.cat(row_block)
        else:
            self.ncode = self.nabs = self.noff = self.row_group = self.row_block = self.code

    def args(self) -> tuple:
        return (self.packed, self.absmax, self.code, self.ncode, self.nabs, self.noff, self.row_group,
                self.row_block)


def default_config(m: int, n: int, k: int, device: torch.device) -> TileConfig:
    if m <= 16:
        cfg = TileConfig(16, 64, 128, warps=4, stages=3)
    elif m <= 64:
        cfg = TileConfig(64, 64, 128, warps=4, stages=3)
    else:
        cfg = TileConfig(128, 128, 64, warps=8, stages=3)
    tiles = triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn)
    split = split_for(tiles, triton.cdiv(k, cfg.bk), device) if m <= 64 else 1
    return TileConfig(cfg.bm, cfg.bn, cfg.bk, split, cfg.warps, cfg.stages)


def nf4_matmul(x: torch.Tensor, w: NF4Weights, bias: torch.Tensor | None,
               config: TileConfig | None = None) -> torch.Tensor:
    """x [M, K] -> x @ W^T (+ bias), [M, N] in x.dtype."""
    m, k = x.shape
    cfg = config or default_config(m, w.n, k, x.device)
    if cfg.bk % w.blocksize:
        raise ValueError(f"K tile {cfg.bk} must be a multiple of the blocksize {w.blocksize}")
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.bk), cfg.split_k) * cfg.bk
    grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(w.n, cfg.bn), triton.cdiv(k, k_per_split))
    out = torch.empty((m, w.n), dtype=x.dtype, device=x.device)
    ws, cnt = splitk_workspace(x.device, m * w.n, grid[0]) if grid[1] > 1 else (out, out)
    _nf4_gemm[grid](x, *w.args(), bias if bias is not None else x, out, ws, cnt, m, w.n, k, x.stride(0),
                    out.stride(0), k_per_split, grid[1], DOUBLE=w.double, BLOCKSIZE=w.blocksize,
                    HAS_BIAS=bias is not None, SPLIT=grid[1] > 1, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk,
                    DOT=dot_dtype(x.dtype), num_warps=cfg.warps, num_stages=cfg.stages, **launch_args(x.device, m))
    return out


# The dequantize kernel's tile (K widened to the blocksize). H100, 8B shapes
# (benchmarks/results/dequant_tiles_h100.json): 32 x 256 moved 1.60-1.84 TB/s against 1.16-1.26 for 32 x 128
# (64 x 128 as fast; 8 warps slower).
DEQUANT_BN, DEQUANT_BK, DEQUANT_WARPS = 32, 256, 4


def nf4_dequantize(w: NF4Weights, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype` (fp32 product, then cast: the reference's rounding)."""
    out = torch.empty((w.n, w.k), dtype=dtype, device=w.packed.device)
    bk = max(w.blocksize, DEQUANT_BK)
    grid = (triton.cdiv(w.n, DEQUANT_BN), triton.cdiv(w.k, bk))
    _nf4_dequant[grid](*w.args(), out, w.n, w.k, DOUBLE=w.double, BLOCKSIZE=w.blocksize, BN=DEQUANT_BN, BK=bk,
                       num_warps=DEQUANT_WARPS)
    return out


class _NF4Kernel(LinearKernel):
    format = "nf4"

    @classmethod
    def can_implement(cls, layer: nn.Module, method, device: torch.device):
        bs = method.config.blocksize
        if bs & (bs - 1) or bs < 16:
            return False, f"blocksize {bs} is not a power of two >= 16"
        return True, ""

    def __init__(self, layer: nn.Module, method) -> None:
        super().__init__(layer, method)
        c = method.config
        self.weights = NF4Weights(layer, c.quant_type, c.blocksize, c.double_quant)


class TritonNF4(_NF4Kernel):
    """Fused two-level dequant inside the GEMM (small M)."""
    name = "triton_nf4"

    M_RANGE, M_RANGE_WHY = (0, 64), "dequantize-then-cuBLAS is faster beyond"

    def __init__(self, layer: nn.Module, method) -> None:
        super().__init__(layer, method)
        n = layer.output_size  # split-K runs up to M = 64 (default_config): workspace sized at load
        splitk_workspace(layer.weight_packed.device, 64 * n, 64 * triton.cdiv(n, 16))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return nf4_matmul(check_2d(x, layer.input_size), self.weights, bias).view(*x.shape[:-1], -1)


class NF4DequantCublas(_NF4Kernel):
    """Dequantize to the activation dtype in one Triton pass, then cuBLAS."""
    name = "nf4_dequant_cublas"

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.linear(x, nf4_dequantize(self.weights, x.dtype), bias)
