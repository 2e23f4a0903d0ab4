"""Triton kernels for the small per-token ops of the Llama decoder, one pass over memory each: RMSNorm (with the
residual add), rotary embedding (q and k in one launch, in place) and SiLU-and-mul. RMSNorm and SiLU-and-mul can
emit their output quantized per token instead (a QuantizedActivation for the next dynamic W8A8 Linear), so the
Linear's own activation-quant pass, a full read and write of the activation, disappears. On Hopper the quantizing
SiLU-and-mul runs csrc/row_quant.cu instead (kernels/cuda_row_quant.py: a row over several multiprocessors).

Numerics follow the torch references (layers/norm.py, rotary.py, activation.py): fp32 arithmetic, rounded to the
activation dtype wherever the eager code rounds, so the outputs equal the reference's except where an fp32 step
(rsqrt, exp, summation order, FMA) lands on the other side of a rounding boundary: an ulp, rarely. The quant mode
is triton_w8a8's arithmetic (scale = max(amax / qmax, 1e-12); INT8 half-to-even in [-128, 127], FP8 saturated at
+-448) applied to the dtype-rounded output, as if the Linear quantized it. Allocations depend on shapes only and
nothing syncs with the host, so every launch can be captured in a CUDA graph."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels import cuda_row_quant
from quantkit.kernels.pdl import launch_args, wait_for_inputs
from quantkit.kernels.triton_common import num_sms, round_to
from quantkit.kernels.triton_w8a8 import dynamic_scale, quantize_codes
from quantkit.quant.w8a8 import QuantizedActivation, W8Type

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_NORM_BLOCK = 65536  # RMSNorm holds a whole row in registers
_MAX_SILU_ROW = 32768  # quantizing SiLU-and-mul holds rows up to this in registers (one read); longer ones loop
_FLOAT_OUT = {"QUANT": False, "QMAX": 0.0, "QMIN": 0.0, "IS_INT": False}  # the kernels' constants without quantization


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, perm_ptr, out_ptr, res_out_ptr, q_ptr, s_ptr, T, N, eps, stride_x,
                     stride_r, HAS_RES: tl.constexpr, HAS_PERM: tl.constexpr, QUANT: tl.constexpr,
                     QMAX: tl.constexpr, QMIN: tl.constexpr, IS_INT: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = (rows < T)[:, None] & (cols < N)[None, :]
    dtype = x_ptr.dtype.element_ty
    x = _norm_input(x_ptr, res_ptr, rows, cols, mask, stride_x, stride_r, HAS_RES, dtype)
    if HAS_RES:
        tl.store(res_out_ptr + rows[:, None] * N + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    src = cols
    if HAS_PERM:  # output column j from input column perm[j]: the row again, gathered (it is in L1 by now)
        src = tl.load(perm_ptr + cols, mask=cols < N, other=0)
        x = _norm_input(x_ptr, res_ptr, rows, src, mask, stride_x, stride_r, HAS_RES, dtype).to(tl.float32)
    h = x * rstd[:, None]
    w = tl.load(w_ptr + src, mask=cols < N, other=0.0).to(tl.float32)
    y = round_to(round_to(h, dtype).to(tl.float32) * w[None, :], dtype)
    if QUANT:
        y = y.to(tl.float32)
        scale = dynamic_scale(tl.max(tl.abs(y), axis=1), QMAX)
        codes = quantize_codes(y, scale[:, None], QMAX, QMIN, IS_INT)
        tl.store(q_ptr + rows[:, None] * N + cols[None, :], codes.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rows, scale, mask=rows < T)
    else:
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], y, mask=mask)


@triton.jit
def _norm_input(x_ptr, res_ptr, rows, cols, mask, stride_x, stride_r, HAS_RES: tl.constexpr, dtype: tl.constexpr):
    """x (+ residual, rounded to the activation dtype as the eager sum is) at columns `cols` of `rows`."""
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = round_to(x + r, dtype)
    return x


@triton.jit
def _rotate_heads(base, stride_h, heads, cos, sin, d, d_ok, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotates `heads` heads of one token in place: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, each product
    and sum rounded to the dtype as the eager reference's q * cos + rotate_half(q) * sin rounds them."""
    dtype = base.dtype.element_ty
    for h0 in range(0, heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < heads)[:, None] & d_ok[None, :]
        p1 = base + h[:, None] * stride_h + d[None, :]
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = round_to(x1 * cos, dtype).to(tl.float32) - round_to(x2 * sin, dtype).to(tl.float32)
        o2 = round_to(x2 * cos, dtype).to(tl.float32) + round_to(x1 * sin, dtype).to(tl.float32)
        tl.store(p1, round_to(o1, dtype), mask=mask)
        tl.store(p1 + HALF, round_to(o2, dtype), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, cache_ptr, q_ptr, k_ptr, stride_qt, stride_qh, stride_kt, stride_kh, H, KVH,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    t = tl.program_id(0).to(tl.int64)
    row = cache_ptr + tl.load(pos_ptr + t).to(tl.int64) * (2 * HALF)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    dtype = q_ptr.dtype.element_ty  # cos and sin are rounded to the activation dtype first, as the reference does
    cos = round_to(tl.load(row + d, mask=d_ok, other=0.0), dtype).to(tl.float32)
    sin = round_to(tl.load(row + HALF + d, mask=d_ok, other=0.0), dtype).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, H, cos[None, :], sin[None, :], d, d_ok, HALF, BLOCK_H)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, KVH, cos[None, :], sin[None, :], d, d_ok, HALF, BLOCK_H)


@triton.jit
def _silu_mul_block(x_row, c0, I, BLOCK: tl.constexpr):
    """silu(gate) * up over columns c0 .. c0 + BLOCK of one row, rounded as the eager F.silu(gate) * up (zero past
    I, so padding never raises an amax)."""
    cols = c0 + tl.arange(0, BLOCK)
    gate = tl.load(x_row + cols, mask=cols < I, other=0.0).to(tl.float32)
    up = tl.load(x_row + I + cols, mask=cols < I, other=0.0).to(tl.float32)
    dtype = x_row.dtype.element_ty
    return round_to(round_to(gate / (1.0 + tl.exp(-gate)), dtype).to(tl.float32) * up, dtype)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, q_ptr, s_ptr, I, stride_x, QUANT: tl.constexpr, QMAX: tl.constexpr,
                     QMIN: tl.constexpr, IS_INT: tl.constexpr, BLOCK: tl.constexpr, WHOLE_ROW: tl.constexpr,
                     PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    if QUANT and WHOLE_ROW:  # one program per row, the row in registers: one read, amax, codes
        cols = tl.arange(0, BLOCK)
        y = _silu_mul_block(x_row, 0, I, BLOCK).to(tl.float32)
        scale = dynamic_scale(tl.max(tl.abs(y), axis=0), QMAX)
        tl.store(s_ptr + row, scale)
        codes = quantize_codes(y, scale, QMAX, QMIN, IS_INT)
        tl.store(q_ptr + row * I + cols, codes.to(q_ptr.dtype.element_ty), mask=cols < I)
    elif QUANT:  # rows too long for registers: the row's amax, then the codes (the second read mostly hits L2)
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(0, I, BLOCK):
            amax = tl.maximum(amax, tl.abs(_silu_mul_block(x_row, c0, I, BLOCK).to(tl.float32)))
        scale = dynamic_scale(tl.max(amax, axis=0), QMAX)
        tl.store(s_ptr + row, scale)
        for c0 in range(0, I, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            codes = quantize_codes(_silu_mul_block(x_row, c0, I, BLOCK).to(tl.float32), scale, QMAX, QMIN, IS_INT)
            tl.store(q_ptr + row * I + cols, codes.to(q_ptr.dtype.element_ty), mask=cols < I)
    else:
        c0 = tl.program_id(1) * BLOCK
        cols = c0 + tl.arange(0, BLOCK)
        tl.store(out_ptr + row * I + cols, _silu_mul_block(x_row, c0, I, BLOCK), mask=cols < I)


def _rows_2d(x: torch.Tensor, what: str) -> torch.Tensor:
    """x [..., C] -> [T, C] with unit stride along C (a view where possible)."""
    if x.dtype not in _DTYPES:
        raise ValueError(f"{what}: activations must be float16, bfloat16 or float32, got {x.dtype}")
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _quant_outputs(shape: torch.Size, quant: W8Type, dtype: torch.dtype, device: torch.device
                   ) -> tuple[QuantizedActivation, dict]:
    """The empty QuantizedActivation of an output `shape` and the kernel arguments that fill it."""
    out = QuantizedActivation(torch.empty(shape, dtype=quant.dtype, device=device),
                              torch.empty((*shape[:-1], 1), dtype=torch.float32, device=device), dtype)
    return out, {"QUANT": True, "QMAX": quant.qmax, "QMIN": quant.qmin, "IS_INT": quant.is_int}


def _warps(elements: int) -> int:
    """Warps for a program that holds `elements` values in registers. Past 8192 (a Llama-3-8B SiLU row, 14336
    wide): 32 warps, 3-5% faster than 16 for the quantizing SiLU-and-mul on an H100 (fewer values per thread)."""
    return 4 if elements <= 1024 else 8 if elements <= 4096 else 16 if elements <= 8192 else 32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             quant: W8Type | None = None, perm: torch.Tensor | None = None
             ) -> tuple[torch.Tensor | QuantizedActivation, torch.Tensor | None]:
    """weight * rmsnorm(x + residual) over the last dim -> (output, x + residual or None). With `quant` the output
    is a QuantizedActivation of it (no float output is written); with `perm` (int32 [N]) output column j is
    column perm[j] (an act-order Linear's input order)."""
    n = x.shape[-1]
    x2 = _rows_2d(x, "rms_norm")
    if weight.dtype != x.dtype or weight.shape != (n,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} {weight.dtype} does not fit activations "
                         f"[..., {n}] {x.dtype}")
    if n > _MAX_NORM_BLOCK:
        raise ValueError(f"rms_norm: hidden size {n} exceeds the {_MAX_NORM_BLOCK} a row-in-registers kernel takes")
    if perm is not None and (perm.shape != (n,) or perm.dtype != torch.int32 or perm.device != x.device):
        raise ValueError(f"rms_norm: perm must be int32 [{n}] on {x.device}, got {perm.dtype} "
                         f"{list(perm.shape)} on {perm.device}")
    t, block = x2.shape[0], triton.next_power_of_2(n)
    # Several short rows per program once there are enough rows to fill the device.
    rows = 1 if t < 8 * num_sms(x.device) else max(1, min(16, 2048 // block))
    r2 = res_out = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} does not match x "
                             f"{tuple(x.shape)} {x.dtype}")
        r2 = _rows_2d(residual, "rms_norm")
        res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if quant is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        consts, targets = _FLOAT_OUT, (out, x2, x2)  # (float output, codes, scales); unused ones get a stand-in
    else:
        out, consts = _quant_outputs(x.shape, quant, x.dtype, x.device)
        targets = (x2, out.q, out.scale)
    _rms_norm_kernel[(triton.cdiv(t, rows),)](
        x2, x2 if r2 is None else r2, weight, weight if perm is None else perm, targets[0],
        x2 if res_out is None else res_out, targets[1], targets[2], t, n, eps, x2.stride(0),
        0 if r2 is None else r2.stride(0), HAS_RES=r2 is not None, HAS_PERM=perm is not None, ROWS=rows,
        BLOCK=block, num_warps=_warps(rows * block), **consts, **launch_args(x.device, t))
    return out, res_out


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, H, D] and k [T, KVH, D] (unit stride along D; e.g. views of one qkv output) in place by the
    neox layout, cos | sin from `cos_sin_cache` [max_pos, D] fp32 at `positions` [T]; returns them. Positions must
    lie in the cache (not checked: that would sync with the host)."""
    t, heads, d = q.shape
    kv_heads = k.shape[1]
    if q.dtype not in _DTYPES or k.dtype != q.dtype or k.shape[0] != t or k.shape[2] != d or \
            positions.shape != (t,):
        raise ValueError(f"rotary: q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} must be 16/32-bit "
                         f"floats sharing T, D and dtype, with one position per token (got {tuple(positions.shape)})")
    if d % 2 or cos_sin_cache.shape[-1] != d or cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"rotary: head dim {d} must be even and match the fp32 cos|sin cache "
                         f"{tuple(cos_sin_cache.shape)} {cos_sin_cache.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or not cos_sin_cache.is_contiguous():
        raise ValueError("rotary: q and k need unit stride along the head dim, and the cache must be contiguous")
    half = d // 2
    block_d = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(heads, kv_heads)), max(1, 2048 // block_d))
    _rotary_kernel[(t,)](positions, cos_sin_cache, q, k, q.stride(0), q.stride(1), k.stride(0), k.stride(1), heads,
                         kv_heads, HALF=half, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=_warps(block_h * block_d),
                         **launch_args(q.device, t))
    return q, k


def silu_and_mul(x: torch.Tensor, quant: W8Type | None = None) -> torch.Tensor | QuantizedActivation:
    """x [..., 2I] = gate | up -> silu(gate) * up [..., I]; with `quant`, a QuantizedActivation of it."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: the last dim ({x.shape[-1]}) must be gate | up, an even size")
    x2 = _rows_2d(x, "silu_and_mul")
    t, inter = x2.shape[0], x2.shape[1] // 2
    shape = (*x.shape[:-1], inter)
    if quant is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul_kernel[(t, triton.cdiv(inter, block))](x2, out, out, out, inter, x2.stride(0), BLOCK=block,
                                                          WHOLE_ROW=False, num_warps=4, **_FLOAT_OUT,
                                                          **launch_args(x.device, t))
        return out
    out, consts = _quant_outputs(torch.Size(shape), quant, x.dtype, x.device)
    if cuda_row_quant.serves(x2, inter):  # rows spread over thread-block clusters (Hopper)
        cuda_row_quant.quantize_rows(x2, out.q.view(t, inter), out.scale.view(t), silu_mul=True)
        return out
    whole = triton.next_power_of_2(inter) <= _MAX_SILU_ROW
    block = triton.next_power_of_2(inter) if whole else 4096
    _silu_mul_kernel[(t,)](x2, x2, out.q, out.scale, inter, x2.stride(0), BLOCK=block, WHOLE_ROW=whole,
                           num_warps=_warps(block), **consts, **launch_args(x.device, t))
    return out
