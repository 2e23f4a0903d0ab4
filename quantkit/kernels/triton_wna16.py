"""Triton kernels for the WNA16 kernel format (quant/wna16.py: qweight [ceil(K*b/32), N] packed along K, qzeros
[NG, ceil(N*b/32)], scales [NG, N], perm [K] for act-order). GPTQ (act-order included), AWQ, RTN and
compressed-tensors W4A16 all arrive in this format, so these kernels serve all of them.

- `wna16_matmul`: dequant-GEMM. Each K tile lies inside one group (BK divides the group size), so one row of
  zeros and scales serves the tile; W = (q - z) * s is formed in fp32 registers, rounded to the activation dtype
  (as Marlin and tinygemm do) and fed to tl.dot, which accumulates in place in fp32. Act-order weights were
  permuted once at load (rows in perm order); each call permutes the activation columns once. With split_k
  > 1 the K range is cut into slices whose fp32 partials are added atomically (small M: fills the GPU).
- `wna16_dequantize`: the weight as a dense [K, N] in the activation dtype, for large M where cuBLAS on the
  dequantized weight beats a fused kernel."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from quantkit.kernels.base import Bucket, LinearKernel
from quantkit.kernels.triton_common import TileConfig, check_2d, dot_dtype, split_for

SUPPORTED_BITS = (2, 4, 8)


@triton.jit
def _wna16_gemm(x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr, M, N, K, ZW, stride_xm, stride_om,
                group_size, k_per_split,
                BITS: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, DOT: tl.constexpr,
                RESHAPE_UNPACK: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n  # grouped launch order: GROUP_M row tiles share each weight column tile in L2
    first_m = (pid // per_group) * GROUP_M
    rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    zshift = (rn % PACK) * BITS
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_stop = min(K, k_start + k_per_split)
    for k0 in range(k_start, k_stop, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if RESHAPE_UNPACK:  # one load per word, unpacked in registers
            rw = k0 // PACK + tl.arange(0, BK // PACK)
            w = tl.load(qw_ptr + rw[:, None] * N + rn[None, :], mask=(rw[:, None] * PACK < K) & n_ok[None, :],
                        other=0)
            q = (w[:, None, :] >> (tl.arange(0, PACK) * BITS)[None, :, None]) & MASK
            q = tl.reshape(q, (BK, BN))
        else:  # each row loads its word (the PACK rows of a word hit L1)
            w = tl.load(qw_ptr + (rk // PACK)[:, None] * N + rn[None, :], mask=k_ok[:, None] & n_ok[None, :],
                        other=0)
            q = (w >> ((rk % PACK) * BITS)[:, None]) & MASK
        g = k0 // group_size
        z = (tl.load(qz_ptr + g * ZW + rn // PACK, mask=n_ok, other=0) >> zshift) & MASK
        s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
        acc = tl.dot(x.to(DOT), ((q - z[None, :]).to(tl.float32) * s[None, :]).to(DOT), acc)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if not ATOMIC:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.atomic_add(out, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _wna16_dequant(qw_ptr, qz_ptr, s_ptr, out_ptr, N, K, ZW, group_size,
                   BITS: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    rk = tl.program_id(0) * BK + tl.arange(0, BK)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    ok = (rk < K)[:, None] & (rn < N)[None, :]
    q = (tl.load(qw_ptr + (rk // PACK)[:, None] * N + rn[None, :], mask=ok, other=0)
         >> ((rk % PACK) * BITS)[:, None]) & MASK
    g = rk // group_size
    z = (tl.load(qz_ptr + g[:, None] * ZW + (rn // PACK)[None, :], mask=ok, other=0)
         >> ((rn % PACK) * BITS)[None, :]) & MASK
    s = tl.load(s_ptr + g[:, None] * N + rn[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rk[:, None] * N + rn[None, :], ((q - z).to(tl.float32) * s).to(out_ptr.dtype.element_ty),
             mask=ok)


def effective_group(group_size: int, k: int) -> int:
    return k if group_size == -1 else group_size


def default_config(m: int, n: int, k: int, group: int, device: torch.device, split: bool) -> TileConfig:
    """Tiles by M: small M streams weights (narrow M tile, K split to fill the GPU), large M is compute-bound."""
    if m <= 16:  # tile sizes from `benchmarks/linear_kernels.py --tune` on an H200
        cfg = TileConfig(16, 64, 128, warps=4, stages=4)
    elif m <= 64:
        cfg = TileConfig(32 if m <= 32 else 64, 64, 128, warps=8, stages=3)
    elif m <= 256:
        cfg = TileConfig(64, 128, 64, warps=8, stages=3)
    else:
        cfg = TileConfig(128, 128, 64, warps=8, stages=3)
    bk = _bk_for(group, k, cfg.bk)
    split_k = 1
    if split:
        tiles = triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn)
        split_k = split_for(tiles, triton.cdiv(k, bk), device)
    return TileConfig(cfg.bm, cfg.bn, bk, split_k, cfg.warps, cfg.stages)


def _bk_for(group: int, k: int, preferred: int) -> int:
    """The largest K tile <= preferred that divides the group (per-channel: any), so no tile straddles groups."""
    if group >= k:
        return preferred
    return next(bk for bk in (preferred, 128, 64, 32, 16) if bk <= preferred and group % bk == 0)


def wna16_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
                 split: bool = False, config: TileConfig | None = None, reshape_unpack: bool = True) -> torch.Tensor:
    """x [M, K] -> [M, N] in x.dtype: x[:, perm] @ W (+ bias), W the dequantized kernel-format weight."""
    m, k = x.shape
    n = scales.shape[1]
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"the Triton WNA16 kernel handles {SUPPORTED_BITS}-bit weights, not {bits}-bit")
    if qweight.shape != (triton.cdiv(k * bits, 32), n):
        raise ValueError(f"qweight shape {tuple(qweight.shape)} does not match K={k}, N={n} at {bits} bits")
    group = effective_group(group_size, k)
    cfg = config or default_config(m, n, k, group, x.device, split)
    if group < k and group % cfg.bk:
        raise ValueError(f"K tile {cfg.bk} does not divide group size {group}")
    gs = group if group < k else triton.cdiv(k, cfg.bk) * cfg.bk  # per channel: every tile is in group 0
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.bk), cfg.split_k) * cfg.bk
    split_k = triton.cdiv(k, k_per_split)
    out = torch.zeros((m, n), dtype=torch.float32, device=x.device) if split_k > 1 else \
        torch.empty((m, n), dtype=x.dtype, device=x.device)
    if perm is not None:  # one gather pass: in-kernel gathered loads stall the pipeline (measured 0.49x vs 0.72x)
        x = x.index_select(1, perm)
    grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn), split_k)
    _wna16_gemm[grid](x, qweight, qzeros, scales, bias if bias is not None else x,
                      out, m, n, k, qzeros.shape[1], x.stride(0), out.stride(0), gs, k_per_split,
                      BITS=bits, HAS_BIAS=bias is not None, ATOMIC=split_k > 1,
                      BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=8, DOT=dot_dtype(x.dtype),
                      RESHAPE_UNPACK=reshape_unpack, num_warps=cfg.warps, num_stages=cfg.stages)
    return out.to(x.dtype) if split_k > 1 else out


def wna16_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                     k: int, dtype: torch.dtype) -> torch.Tensor:
    """The kernel-format weight as [K, N] in `dtype` (rows in perm order), computed in fp32 then cast."""
    n = scales.shape[1]
    out = torch.empty((k, n), dtype=dtype, device=qweight.device)
    group = effective_group(group_size, k)
    grid = (triton.cdiv(k, 32), triton.cdiv(n, 128))
    _wna16_dequant[grid](qweight, qzeros, scales, out, n, k, qzeros.shape[1], group, BITS=bits, BK=32, BN=128)
    return out


class _WNA16Kernel(LinearKernel):
    format = "wna16"

    @classmethod
    def can_implement(cls, layer: nn.Module, method, device: torch.device, bucket: Bucket | None):
        group = effective_group(method.group_size, layer.input_size)
        if method.bits not in SUPPORTED_BITS:
            return False, f"{method.bits}-bit codes straddle int32 words (handles {SUPPORTED_BITS})"
        if group < layer.input_size and group % 16:
            return False, f"group size {group} is not a multiple of 16"
        return True, ""

    def __init__(self, layer: nn.Module, method) -> None:
        super().__init__(layer, method)
        self.bits, self.group_size = method.bits, method.group_size


class TritonWNA16(_WNA16Kernel):
    """Fused dequant-GEMM, one pass over K per output tile."""
    name = "triton_wna16"

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = check_2d(x, layer.input_size)
        out = wna16_matmul(x2, layer.qweight, layer.qzeros, layer.scales, layer.perm, bias, self.bits,
                           self.group_size, split=isinstance(self, TritonWNA16SplitK))
        return out.view(*x.shape[:-1], -1)


class TritonWNA16SplitK(TritonWNA16):
    """The same kernel with K cut across programs: at small M the output alone has too few tiles to fill the GPU."""
    name = "triton_wna16_splitk"

    @classmethod
    def can_implement(cls, layer, method, device, bucket):
        if bucket is not None and not bucket.small:
            return False, "split-K only pays at small M"
        return super().can_implement(layer, method, device, bucket)


class WNA16DequantCublas(_WNA16Kernel):
    """Dequantize the whole weight to the activation dtype (one pass), then cuBLAS: on an H200 this beats the
    fused Triton kernel from M = 64 on (benchmarks/results/linear_kernels.json)."""
    name = "wna16_dequant_cublas"

    @classmethod
    def can_implement(cls, layer, method, device, bucket):
        if bucket is not None and bucket.small:
            return False, "dequantizing the whole weight per call does not pay at small M"
        return super().can_implement(layer, method, device, bucket)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = check_2d(x, layer.input_size)
        w = wna16_dequantize(layer.qweight, layer.qzeros, layer.scales, self.bits, self.group_size,
                             layer.input_size, x.dtype)
        if layer.perm is not None:
            x2 = x2.index_select(1, layer.perm)
        out = torch.mm(x2, w) if bias is None else torch.addmm(bias.to(x.dtype), x2, w)
        return out.view(*x.shape[:-1], -1)
