"""Triton kernels for the WNA16 kernel format (quant/wna16.py: qweight [ceil(K*b/32), N] packed along K, qzeros
[NG, ceil(N*b/32)], scales [NG, N], perm [K] for act-order). GPTQ (act-order included), AWQ, RTN and
compressed-tensors W4A16 all arrive in this format, so these kernels serve all of them.

- `wna16_splitk_matmul` (small M): split-K dequant-GEMM in one launch, see `_wna16_splitk`.
- `wna16_matmul`: one-pass dequant-GEMM. Each K tile lies inside one group (BK divides the group size), so one
  row of zeros and scales serves the tile; W = (q - z) * s is formed in fp32 registers, rounded to the
  activation dtype (as Marlin and tinygemm do) and fed to tl.dot, which accumulates in fp32. Act-order weights
  were permuted once at load (rows in perm order); each call permutes the activation columns once.
- `wna16_dequantize`: the weight as a dense [K, N] in the activation dtype, for large M where cuBLAS on the
  dequantized weight beats a fused kernel; act-order rows go back to their input channels as they are written,
  so the activations are used as they come."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from quantkit.kernels.base import LinearKernel
from quantkit.kernels.pdl import launch_args, wait_for_inputs
from quantkit.kernels.triton_common import (TileConfig, check_2d, dot_dtype, grouped_tile, num_sms,
                                            splitk_workspace, store_split_tile)

SUPPORTED_BITS = (2, 4, 8)
# The dequantize kernel's tile. H100, 8B shapes (benchmarks/results/wgmma_tiles_h100.json, dequant): 16 x 256 moved
# 1.80-2.14 TB/s against 1.70-1.97 for 32 x 128; taller tiles were slower (64 x 128: 1.30-1.49).
DEQUANT_BK, DEQUANT_BN, DEQUANT_WARPS = 16, 256, 4


@triton.jit
def _wna16_gemm(x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr, M, N, K, ZW, stride_xm, stride_om,
                group_size,
                BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, DOT: tl.constexpr,
                PDL: tl.constexpr):
    wait_for_inputs(PDL)
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    zshift = (rn % PACK) * BITS
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        rw = k0 // PACK + tl.arange(0, BK // PACK)  # one load per word, unpacked in registers
        w = tl.load(qw_ptr + rw[:, None] * N + rn[None, :], mask=(rw[:, None] * PACK < K) & n_ok[None, :], other=0)
        q = tl.reshape((w[:, None, :] >> (tl.arange(0, PACK) * BITS)[None, :, None]) & MASK, (BK, BN))
        g = k0 // group_size
        z = (tl.load(qz_ptr + g * ZW + rn // PACK, mask=n_ok, other=0) >> zshift) & MASK
        s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
        acc = tl.dot(x.to(DOT), ((q - z[None, :]).to(tl.float32) * s[None, :]).to(DOT), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _wna16_splitk(x_ptr, qw_ptr, qz_ptr, s_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, ZW,
                  stride_xm, stride_om, group_size, k_per_split, n_split,
                  BITS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr, DOT: tl.constexpr,
                  PDL: tl.constexpr):
    """Small-M dequant-GEMM over one (N tile, K slice, M tile). The zero point leaves the inner loop:
    sum_k x_k s (q_k - z) = s (sum_k x_k q_k - z sum_k x_k), so only the raw codes meet the activations.
    USE_DOT (M > 1): the codes of BK // PACK words unpack j-major (tile row j * BKW + r holds k = PACK r + j, no
    interleave) and the activation columns are loaded in that order; tl.dot multiplies the integer codes
    (exact in 16-bit floats); BK divides the group, so one scale/zero row serves the tile.
    Otherwise (M = 1, one row per program): broadcast-multiply-add. Code j of a word is moved to the top
    mantissa bits of 1.0f, which reads as 1 + q / 2^BITS (shift + and-or + fma per weight, no int->float
    conversion); per word row the scale and zero of its group are applied, and the K rows are summed once at
    the end. Act-order at M = 1: x columns are gathered through perm in the kernel (no gather launch)."""
    wait_for_inputs(PDL)
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    BKW: tl.constexpr = BK // PACK
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    zshift = (rn % PACK) * BITS
    k_start = pid_k * k_per_split
    k_stop = min(K, k_start + k_per_split)
    rw = tl.arange(0, BKW)
    if USE_DOT:
        rm = pid_m * BM + tl.arange(0, BM)
        m_ok = rm < M
        p = tl.arange(0, BK)
        kofs = PACK * (p % BKW) + p // BKW
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(k_start, k_stop, BK):
            rk = k0 + kofs
            k_ok = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(qw_ptr + (k0 // PACK + rw)[:, None] * N + rn[None, :],
                        mask=(k0 + rw * PACK < K)[:, None] & n_ok[None, :], other=0)
            q = tl.reshape((w[None, :, :] >> (tl.arange(0, PACK) * BITS)[:, None, None]) & MASK, (BK, BN))
            g = k0 // group_size
            z = (tl.load(qz_ptr + g * ZW + rn // PACK, mask=n_ok, other=0) >> zshift) & MASK
            s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
            d = tl.dot(x.to(DOT), q.to(DOT))
            xs = tl.sum(x.to(tl.float32), axis=1)
            acc += s[None, :] * (d - z.to(tl.float32)[None, :] * xs[:, None])
        out_off = rm[:, None] * stride_om + rn[None, :]
        ws_off = rm[:, None] * N + rn[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    else:
        FIELD: tl.constexpr = MASK << (23 - BITS)
        acc2 = tl.zeros((BKW, BN), dtype=tl.float32)
        for k0 in range(k_start, k_stop, BK):
            rk = k0 + rw * PACK
            r_ok = rk < K
            w = tl.load(qw_ptr + (k0 // PACK + rw)[:, None] * N + rn[None, :], mask=r_ok[:, None] & n_ok[None, :],
                        other=0)
            t = tl.zeros((BKW, BN), dtype=tl.float32)
            xs = tl.zeros((BKW,), dtype=tl.float32)
            for j in tl.static_range(PACK):
                kj = rk + j
                xk = tl.load(perm_ptr + kj, mask=kj < K, other=0) if HAS_PERM else kj
                xj = tl.load(x_ptr + pid_m * stride_xm + xk, mask=kj < K, other=0.0).to(tl.float32)
                if 23 - BITS >= BITS * j:
                    f = w << (23 - BITS - BITS * j)
                else:
                    f = w >> (BITS * j - 23 + BITS)
                t += ((f & FIELD) | 0x3F800000).to(tl.float32, bitcast=True) * xj[:, None]
                xs += xj
            g = rk // group_size
            gn_ok = r_ok[:, None] & n_ok[None, :]
            s = tl.load(s_ptr + g[:, None] * N + rn[None, :], mask=gn_ok, other=0.0).to(tl.float32)
            z = (tl.load(qz_ptr + g[:, None] * ZW + (rn // PACK)[None, :], mask=gn_ok, other=0)
                 >> zshift[None, :]) & MASK
            acc2 += s * ((1 << BITS) * t - ((1 << BITS) + z).to(tl.float32) * xs[:, None])
        acc = tl.sum(acc2, axis=0)
        out_off = pid_m * stride_om + rn
        ws_off = pid_m * N + rn
        mask = n_ok
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tile = pid_m * tl.num_programs(0) + pid_n
    store_split_tile(acc, out_ptr + out_off, ws_ptr + ws_off, cnt_ptr + tile, mask, n_split, SPLIT)


@triton.jit
def _wna16_dequant(qw_ptr, qz_ptr, s_ptr, perm_ptr, out_ptr, N, K, ZW, group_size,
                   BITS: tl.constexpr, HAS_PERM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """Kernel-format rows rk -> out rows rk, or perm[rk] (the original input channel) for act-order weights."""
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
    row = tl.load(perm_ptr + rk, mask=rk < K, other=0) if HAS_PERM else rk
    tl.store(out_ptr + row.to(tl.int64)[:, None] * N + rn[None, :],
             ((q - z).to(tl.float32) * s).to(out_ptr.dtype.element_ty), mask=ok)


def effective_group(group_size: int, k: int) -> int:
    return k if group_size == -1 else group_size


def default_config(m: int, n: int, k: int, group: int) -> TileConfig:
    """Tiles by M for the one-pass kernel (from `benchmarks/linear_kernels.py --tune` on an H200)."""
    if m <= 16:
        cfg = TileConfig(16, 64, 128, warps=4, stages=4)
    elif m <= 64:
        cfg = TileConfig(32 if m <= 32 else 64, 64, 128, warps=8, stages=3)
    elif m <= 256:
        cfg = TileConfig(64, 128, 64, warps=8, stages=3)
    else:
        cfg = TileConfig(128, 128, 64, warps=8, stages=3)
    return TileConfig(cfg.bm, cfg.bn, _bk_for(group, k, cfg.bk), 1, cfg.warps, cfg.stages)


def _bk_for(group: int, k: int, preferred: int) -> int:
    """The largest K tile <= preferred that divides the group (per-channel: any), so no tile straddles groups."""
    if group >= k:
        return preferred
    return next(bk for bk in (preferred, 128, 64, 32, 16) if bk <= preferred and group % bk == 0)


def _check_weights(qweight: torch.Tensor, bits: int, k: int, n: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"the Triton WNA16 kernel handles {SUPPORTED_BITS}-bit weights, not {bits}-bit")
    if qweight.shape != (triton.cdiv(k * bits, 32), n):
        raise ValueError(f"qweight shape {tuple(qweight.shape)} does not match K={k}, N={n} at {bits} bits")


def wna16_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
                 config: TileConfig | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x.dtype: x[:, perm] @ W (+ bias), W the dequantized kernel-format weight."""
    m, k = x.shape
    n = scales.shape[1]
    _check_weights(qweight, bits, k, n)
    group = effective_group(group_size, k)
    cfg = config or default_config(m, n, k, group)
    if group < k and group % cfg.bk:
        raise ValueError(f"K tile {cfg.bk} does not divide group size {group}")
    gs = group if group < k else triton.cdiv(k, cfg.bk) * cfg.bk  # per channel: every tile is in group 0
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if perm is not None:  # one gather pass: in-kernel gathered loads stall the pipeline (measured 0.49x vs 0.72x)
        x = x.index_select(1, perm)
    grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn),)
    _wna16_gemm[grid](x, qweight, qzeros, scales, bias if bias is not None else x, out, m, n, k, qzeros.shape[1],
                      x.stride(0), out.stride(0), gs, BITS=bits, HAS_BIAS=bias is not None,
                      BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=8, DOT=dot_dtype(x.dtype),
                      num_warps=cfg.warps, num_stages=cfg.stages, **launch_args(x.device, m))
    return out


SPLITK_MAX_M = 64  # the largest M the split-K kernel cuts K for (its workspace is sized for it at load)


def splitk_config(m: int, n: int, k: int, bits: int, group: int, device: torch.device) -> TileConfig:
    """M = 1: the FMA path, 32 word rows x 128 columns per step (64 columns once 128-wide tiles alone would
    cover the multiprocessors); M > 1: tl.dot tiles 256 wide. K is cut so that the grid holds >= 2 programs per
    multiprocessor and no program walks more than 6 K steps (`benchmarks/linear_kernels.py --tune`, H200:
    fewer, longer programs lose bandwidth)."""
    sms = num_sms(device)
    if m == 1:
        cfg = TileConfig(1, 64 if triton.cdiv(n, 128) >= sms else 128, 32 * (32 // bits), warps=4, stages=1)
    else:
        cfg = TileConfig(16 if m <= 16 else 32 if m <= 32 else 64, 256, _bk_for(group, k, 128), warps=8, stages=2)
    split = 1
    if m <= SPLITK_MAX_M:
        tiles = triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn)
        steps = triton.cdiv(k, cfg.bk)
        split = max(1, min(max(triton.cdiv(2 * sms, tiles), triton.cdiv(steps, 6)), steps))
    return TileConfig(cfg.bm, cfg.bn, cfg.bk, split, cfg.warps, cfg.stages)


def wna16_splitk_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                        perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
                        config: TileConfig | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x.dtype: x[:, perm] @ W (+ bias), one launch (split-K partials are reduced in the
    kernel through the shared workspace)."""
    m, k = x.shape
    n = scales.shape[1]
    _check_weights(qweight, bits, k, n)
    group = effective_group(group_size, k)
    cfg = config or splitk_config(m, n, k, bits, group, x.device)
    use_dot = cfg.bm > 1
    if use_dot and group < k and group % cfg.bk:
        raise ValueError(f"K tile {cfg.bk} does not divide group size {group}")
    if cfg.split_k > 1 and m > SPLITK_MAX_M:
        raise ValueError(f"split-K is sized for M <= {SPLITK_MAX_M}, got M = {m}")
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.bk), cfg.split_k) * cfg.bk
    grid = (triton.cdiv(n, cfg.bn), triton.cdiv(k, k_per_split), triton.cdiv(m, cfg.bm))
    if perm is not None and use_dot:  # a gather inside the dot path costs more than one gather launch (--tune)
        x, perm = x.index_select(1, perm), None
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws, cnt = splitk_workspace(x.device, m * n, grid[0] * grid[2]) if grid[1] > 1 else (out, out)
    _wna16_splitk[grid](x, qweight, qzeros, scales, perm if perm is not None else x, bias if bias is not None else x,
                        out, ws, cnt, m, n, k, qzeros.shape[1], x.stride(0), out.stride(0), group, k_per_split,
                        grid[1], BITS=bits, HAS_PERM=perm is not None, HAS_BIAS=bias is not None,
                        SPLIT=grid[1] > 1, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, USE_DOT=use_dot,
                        DOT=dot_dtype(x.dtype), num_warps=cfg.warps, num_stages=cfg.stages,
                        **launch_args(x.device, m))
    return out


def wna16_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                     k: int, dtype: torch.dtype, perm: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel-format weight as [K, N] in `dtype`, computed in fp32 then cast. Rows in perm order, or with
    `perm` back in the original input-channel order: x @ W then needs no gathered copy of x (torch's
    index_select of a [4096, 14336] activation cost a third of the GEMM on an H100)."""
    n = scales.shape[1]
    out = torch.empty((k, n), dtype=dtype, device=qweight.device)
    group = effective_group(group_size, k)
    grid = (triton.cdiv(k, DEQUANT_BK), triton.cdiv(n, DEQUANT_BN))
    _wna16_dequant[grid](qweight, qzeros, scales, perm if perm is not None else qweight, out, n, k, qzeros.shape[1],
                         group, BITS=bits, HAS_PERM=perm is not None, BK=DEQUANT_BK, BN=DEQUANT_BN,
                         num_warps=DEQUANT_WARPS)
    return out


class _WNA16Kernel(LinearKernel):
    format = "wna16"

    @classmethod
    def can_implement(cls, layer: nn.Module, method, device: torch.device):
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
    matmul = staticmethod(wna16_matmul)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = check_2d(x, layer.input_size)
        out = self.matmul(x2, layer.qweight, layer.qzeros, layer.scales, layer.perm, bias, self.bits,
                          self.group_size)
        return out.view(*x.shape[:-1], -1)


class TritonWNA16SplitK(TritonWNA16):
    """Small-M kernel (`_wna16_splitk`): K cut across programs because at small M the output alone has too few
    tiles to fill the GPU; one launch per call (in-kernel split reduction and act-order gather)."""
    name = "triton_wna16_splitk"
    matmul = staticmethod(wna16_splitk_matmul)

    M_RANGE, M_RANGE_WHY = (0, 32), "dequantize-then-cuBLAS is faster beyond"

    def __init__(self, layer: nn.Module, method) -> None:
        super().__init__(layer, method)
        n = layer.scales.shape[1]
        splitk_workspace(layer.qweight.device, SPLITK_MAX_M * n, SPLITK_MAX_M * triton.cdiv(n, 16))


class WNA16DequantCublas(_WNA16Kernel):
    """Dequantize the whole weight to the activation dtype (one pass), then cuBLAS: on an H200 this beats the
    fused Triton kernel from M = 64 on (benchmarks/results/linear_kernels.json)."""
    name = "wna16_dequant_cublas"

    M_RANGE, M_RANGE_WHY = (32, None), "dequantizing the whole weight per call does not pay at small M"

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = check_2d(x, layer.input_size)
        w = wna16_dequantize(layer.qweight, layer.qzeros, layer.scales, self.bits, self.group_size,
                             layer.input_size, x.dtype, layer.perm)
        out = torch.mm(x2, w) if bias is None else torch.addmm(bias.to(x.dtype), x2, w)
        return out.view(*x.shape[:-1], -1)
