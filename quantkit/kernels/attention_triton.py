"""Paged attention in Triton: one KV-write kernel and one attention kernel that serves a whole mixed step.

The attention kernel walks "query tiles": BLOCK_Q consecutive new tokens of one sequence times the GROUP query
heads that share one kv head, so each program reads a kv head's keys/values once for its whole query group (GQA).
Keys/values come from the paged pool through the block table, a TILE_N-token tile at a time whatever the page size,
and FP8 pools are dequantized in registers (k_scale folded into the softmax scale, v_scale into the output), so an
FP8 cache reads half the bytes with no separate dequant pass. FP8 V is read as byte pairs (uint16): PV needs V
transposed, which Triton does for 16-bit shared tiles with ldmatrix.trans but for 8-bit ones with a byte load per
element; the pairs' low and high bytes are the even and odd head dims, multiplied in two half-width dots whose
accumulators interleave at the end. The next key tile's page numbers are loaded one iteration ahead, so the K/V loads
depend only on loop-carried values and Triton's pipeliner gives them num_stages buffers. With both, FP8 KV decodes
1.76-1.87x faster than bf16 KV from 8k context on an H100 (benchmarks/results/attention_h100.json).
Query j of a sequence sits at position seq_len - q_len + j, which makes chunked prefills and prefix-cached prompts
plain cases of the same loop.
When the grid is too small to fill the device (decodes of a small batch over long contexts) the context is split
into segments whose partial softmax states a second kernel merges (flash-decoding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantkit.kernels.pdl import launch_args, wait_for_inputs
from quantkit.kernels.triton_common import dot_dtype, interpreting, num_sms
from quantkit.kernels.triton_w8a8 import _round_half_even
from quantkit.layers.attention import Attention, AttentionBackend, AttentionMetadata

_FP8 = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}  # mantissa bits, smallest normal exponent


@triton.jit
def _round_fp8(y, MANT: tl.constexpr, MIN_EXP: tl.constexpr):
    """fp32 within the format's range -> its nearest FP8 value (ties to even), still fp32, so the final cast is exact
    whatever rounding the conversion uses (the interpreter's fp8 cast mis-rounds)."""
    exponent = tl.maximum(((y.to(tl.int32, bitcast=True) >> 23) & 255) - 127, MIN_EXP)  # subnormals: one step
    step = ((exponent - MANT + 127) << 23).to(tl.float32, bitcast=True)
    r = _round_half_even(y / step) * step
    return tl.where(r == 0.0, y * 0.0, r)  # keep the sign of values that round to zero, as torch's cast does


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, ck_ptr, cv_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                     KVH: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                     FP8: tl.constexpr, FP8_MAX: tl.constexpr, MANT: tl.constexpr, MIN_EXP: tl.constexpr,
                     PDL: tl.constexpr):
    wait_for_inputs(PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < KVH) & (d < D)
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask, other=0.0)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask, other=0.0)
        if FP8:
            k = tl.div_rn(k.to(tl.float32), tl.load(k_scale_ptr).to(tl.float32))
            v = tl.div_rn(v.to(tl.float32), tl.load(v_scale_ptr).to(tl.float32))
            k = _round_fp8(tl.minimum(tl.maximum(k, -FP8_MAX), FP8_MAX), MANT, MIN_EXP)
            v = _round_fp8(tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX), MANT, MIN_EXP)
        offs = slot * stride_cs + h * stride_ch + d
        tl.store(ck_ptr + offs, k.to(ck_ptr.dtype.element_ty), mask=mask)
        tl.store(cv_ptr + offs, v.to(cv_ptr.dtype.element_ty), mask=mask)


def _pairs_asm(fmt: str) -> tl.constexpr:
    """PTX for 2 uint16 pairs of FP8 (bytes b0 b1 | b2 b3) -> f16x2 (b0, b2) and f16x2 (b1, b3): one byte permute,
    two hardware conversions."""
    return tl.constexpr(f"""{{
        .reg .b32 t;
        .reg .b16 lo, hi;
        prmt.b32 t, $2, 0, 0x3120;
        mov.b32 {{lo, hi}}, t;
        cvt.rn.f16x2.{fmt}x2 $0, lo;
        cvt.rn.f16x2.{fmt}x2 $1, hi;
        }}""")


_E4M3_PAIRS = _pairs_asm("e4m3")
_E5M2_PAIRS = _pairs_asm("e5m2")


@triton.jit
def _fp8_pairs_to_f16(x, E5M2: tl.constexpr, ASM: tl.constexpr):
    """uint16 pairs of FP8 values -> (low bytes, high bytes) as fp16; the interpreter has no inline asm."""
    if ASM:
        return tl.inline_asm_elementwise(asm=_E5M2_PAIRS if E5M2 else _E4M3_PAIRS, constraints="=r,=r,r", args=[x],
                                         dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    else:
        fmt: tl.constexpr = tl.float8e5 if E5M2 else tl.float8e4nv
        lo = (x & 0xFF).to(tl.uint8).to(fmt, bitcast=True).to(tl.float16)
        hi = (x >> 8).to(tl.uint8).to(fmt, bitcast=True).to(tl.float16)
        return lo, hi


@triton.jit
def _out_column(dest_ptr, head, d, D: tl.constexpr, mask, PERMUTED: tl.constexpr):
    """Where output element (head, d) goes within its token's row of the contiguous [T, H, D] output: column
    head * D + d, or with PERMUTED (an act-order o_proj reads the row permuted) dest[head * D + d]."""
    if PERMUTED:
        return tl.load(dest_ptr + head * D + d, mask=mask, other=0).to(tl.int32)  # int64 in memory (torch's scatter)
    return head * D + d


@triton.jit
def _find_seq(qsl_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning query tile `tile`: sequence s owns tiles from qsl[s] // BLOCK_Q + s on (at least
    ceil(q_len / BLOCK_Q) of them; the spare ones return at once)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# num_seqs and window vary from step to step: left unspecialized (Triton otherwise compiles a variant apart for
# values divisible by 16 and for 1), a step of 16 or 272 sequences does not compile anew inside a request (four
# such compiles cost a fresh H100 engine's first 1,000-request run ~3 s).
@triton.jit(do_not_specialize=["num_seqs", "window"])
def _attention_kernel(out_ptr, dest_ptr, part_acc_ptr, part_ml_ptr, q_ptr, k_ptr, v_ptr, block_table_ptr, qsl_ptr,
                      seq_lens_ptr, k_scale_ptr, v_scale_ptr, sm_scale, num_seqs, window,
                      stride_qt, stride_qh, stride_ot, stride_ks, stride_kh, stride_bt,
                      H: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr,
                      D_P: tl.constexpr, PAGE: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
                      NUM_SEGMENTS: tl.constexpr, PAGED: tl.constexpr, FP8: tl.constexpr, SLIDING: tl.constexpr,
                      DOT: tl.constexpr, PRECISION: tl.constexpr, Q_MAX: tl.constexpr, E5M2: tl.constexpr,
                      ASM: tl.constexpr, PERMUTED: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seg = tl.program_id(2)
    s = _find_seq(qsl_ptr, tile, num_seqs, BLOCK_Q)
    q_begin = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q_begin
    local = tile - (q_begin // BLOCK_Q + s)
    if local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + s)
    ctx = seq_len - q_len  # position of the sequence's first new token

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
    rows = tl.arange(0, BLOCK_M)
    qi = local * BLOCK_Q + rows // GROUP_P
    head = kvh * GROUP + rows % GROUP_P
    row_ok = (qi < q_len) & (rows % GROUP_P < GROUP)
    q_pos = ctx + qi
    d = tl.arange(0, D_P)
    d_ok = d < D
    tok = (q_begin + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if Q_MAX > 0:  # bf16 queries as fp16 operands: exact up to the fp16 range, saturated past it
        q = tl.minimum(tl.maximum(q.to(tl.float32), -Q_MAX), Q_MAX)
    q = q.to(DOT)

    # the keys any query of the tile can see, in TILE_N tiles, split evenly over the segments
    first_pos = ctx + local * BLOCK_Q
    kv_hi = tl.minimum(first_pos + BLOCK_Q, seq_len)
    kv_lo = 0
    if SLIDING:
        kv_lo = tl.maximum(first_pos - window + 1, 0)
    t_lo = kv_lo // TILE_N
    t_hi = tl.cdiv(kv_hi, TILE_N)
    per_seg = tl.cdiv(t_hi - t_lo, NUM_SEGMENTS)
    t_begin = t_lo + seg * per_seg
    t_end = tl.minimum(t_begin + per_seg, t_hi)

    qk_scale = sm_scale * 1.4426950408889634  # softmax in base 2
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)
    acc_even = tl.zeros([BLOCK_M, D_P // 2], tl.float32)  # FP8: even and odd head dims
    acc_odd = tl.zeros([BLOCK_M, D_P // 2], tl.float32)
    pair = tl.arange(0, D_P // 2)
    n = tl.arange(0, TILE_N)
    if PAGED:
        first = t_begin * TILE_N + n
        next_page = tl.load(block_table_ptr + s * stride_bt + first // PAGE, mask=first < kv_hi, other=0)
    for t in range(t_begin, t_end):
        pos = t * TILE_N + n
        pos_ok = pos < kv_hi
        if PAGED:
            page = next_page
            ahead = pos + TILE_N
            next_page = tl.load(block_table_ptr + s * stride_bt + ahead // PAGE, mask=ahead < kv_hi, other=0)
            slot = page.to(tl.int64) * PAGE + pos % PAGE
        else:
            slot = (q_begin + pos).to(tl.int64)
        kv_offs = slot[:, None] * stride_ks + kvh * stride_kh + d[None, :]
        kv_mask = pos_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0).to(DOT)
        if FP8:
            pairs = tl.load(v_ptr.to(tl.pointer_type(tl.uint16)) + (slot[:, None] * stride_ks + kvh * stride_kh) // 2
                            + pair[None, :], mask=pos_ok[:, None] & (pair < D // 2)[None, :], other=0)
            v_even, v_odd = _fp8_pairs_to_f16(pairs, E5M2, ASM)
        else:
            v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0).to(DOT)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
        if SLIDING:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP8:
            acc_even = acc_even * alpha[:, None] + tl.dot(p.to(DOT), v_even.to(DOT), input_precision=PRECISION)
            acc_odd = acc_odd * alpha[:, None] + tl.dot(p.to(DOT), v_odd.to(DOT), input_precision=PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PRECISION)
        m_i = m_new
    if FP8:
        acc = tl.reshape(tl.join(acc_even, acc_odd), [BLOCK_M, D_P])

    v_scale = 1.0
    if FP8:
        v_scale = tl.load(v_scale_ptr).to(tl.float32)
    out_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SEGMENTS == 1:
        out = acc * (v_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + _out_column(dest_ptr, head[:, None], d[None, :], D, out_mask,
                                                                    PERMUTED),
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part = (tok[:, None] * H + head[:, None]) * NUM_SEGMENTS + seg  # [T, H, NUM_SEGMENTS] rows
        tl.store(part_acc_ptr + part * D_P + d[None, :], acc * v_scale, mask=out_mask)
        ml = part_ml_ptr + part * 2
        tl.store(ml, m_i[:, None], mask=row_ok[:, None])
        tl.store(ml + 1, l_i[:, None], mask=row_ok[:, None])


@triton.jit
def _merge_segments_kernel(out_ptr, dest_ptr, part_acc_ptr, part_ml_ptr, stride_ot, H: tl.constexpr,
                           D: tl.constexpr, D_P: tl.constexpr, NUM_SEGMENTS: tl.constexpr, PERMUTED: tl.constexpr,
                           PDL: tl.constexpr):
    """out[t, h] from the segments' (unnormalized acc, running max, running sum), in one pass."""
    wait_for_inputs(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)
    row = (t * H + h) * NUM_SEGMENTS + tl.arange(0, NUM_SEGMENTS)
    m = tl.load(part_ml_ptr + row * 2)
    l_seg = tl.load(part_ml_ptr + row * 2 + 1)
    m_max = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))  # empty segments weigh nothing
    d = tl.arange(0, D_P)
    acc = tl.load(part_acc_ptr + row[:, None] * D_P + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_seg * w, 0)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + _out_column(dest_ptr, h, d, D, d < D, PERMUTED),
             out.to(out_ptr.dtype.element_ty), mask=d < D)


def write_kv(layer: Attention, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter k/v [T, KVH, D] into the pool at flat slots in one launch; slot -1 is skipped. FP8 pools store
    x / scale, saturated and rounded to nearest even like the torch reference."""
    cache = layer.kv_cache
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    fp8 = cache.dtype in _FP8
    mant, min_exp = _FP8.get(cache.dtype, (0, 0))
    kvh, dim = layer.num_kv_heads, layer.head_dim
    _write_kv_kernel[(k.shape[0],)](
        k, v, cache[0], cache[1], slot_mapping, layer.k_scale, layer.v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), cache.stride(2), cache.stride(3),
        KVH=kvh, D=dim, BLOCK_H=triton.next_power_of_2(kvh), BLOCK_D=triton.next_power_of_2(dim), FP8=fp8,
        FP8_MAX=torch.finfo(cache.dtype).max if fp8 else 0.0, MANT=mant, MIN_EXP=min_exp,
        **launch_args(k.device, k.shape[0]))


def _segments(programs: int, max_seq_len: int, tile_n: int, device: torch.device) -> int:
    """Context segments per query tile: enough programs for ~8 per multiprocessor, each >= 4 key tiles, and two
    even when the grid alone fills the device: a program then walks half the context, and the two halves' loads
    overlap (H200, decode batch 128, FP8 KV: 688 us against 925 us at 8k context, 2639 against 3674 at 32k;
    benchmarks/results/attention_tune.json)."""
    want = max(2, (8 * num_sms(device)) // max(programs, 1))
    most = max(1, max_seq_len // (4 * tile_n))
    return 1 << max(0, math.floor(math.log2(max(1, min(want, most, 64)))))


@dataclass(frozen=True)
class DecodeLaunch:
    """Launch settings of decode-like steps (16-row query tiles); `min_segments` raises the context split."""
    tile_n: int
    warps: int = 4
    stages: int = 3
    min_segments: int = 1


class TritonAttentionBackend(AttentionBackend):
    """`decode_launch` replaces the decode launch settings of every KV dtype (benchmarks/attention.py --tune)."""
    name = "triton"
    kv_cache_dtypes = tuple(_FP8)
    cuda_graphs = True
    writes_out_dest = True

    def __init__(self, decode_launch: DecodeLaunch | None = None) -> None:
        self.decode_launch = decode_launch

    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        paged = meta.slot_mapping is not None and layer.kv_cache is not None
        if paged:
            if not layer.kv_cache.is_contiguous():
                raise ValueError("the KV pool must be a contiguous [2, blocks, block_size, kv_heads, head_dim] tensor")
            write_kv(layer, k, v, meta.slot_mapping)
            cache = layer.kv_cache
            k_src, v_src, page, table = cache[0], cache[1], cache.shape[2], meta.block_tables
            if cache.dtype in _FP8:
                if layer.head_dim % 2:
                    raise ValueError(f"an FP8 KV cache needs an even head_dim, got {layer.head_dim}")
                v_src = v_src.view(torch.uint8)  # read as byte pairs
            stride_ks, stride_kh, stride_bt = cache.stride(2), cache.stride(3), table.stride(0)
        else:
            if k.stride() != v.stride():
                k, v = k.contiguous(), v.contiguous()
            k_src, v_src, page, table = k, v, 1, meta.seq_lens  # table unused
            stride_ks, stride_kh, stride_bt = k.stride(0), k.stride(1), 0
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous: the kernels' column = head * D + d
        num_tokens, num_heads, dim = q.shape
        if num_tokens == 0:
            return out
        if q.stride(-1) != 1:
            q = q.contiguous()
        starts, num_seqs = meta.query_start_loc_cpu, meta.num_seqs
        max_q = max(starts[i + 1] - starts[i] for i in range(num_seqs))
        group = num_heads // layer.num_kv_heads
        group_p = triton.next_power_of_2(group)
        d_p = triton.next_power_of_2(dim)
        fp8 = paged and layer.kv_cache.dtype in _FP8
        dot = dot_dtype(q.dtype)
        # FP8 pools multiply in fp16 even for bf16 models: fp8 -> fp16 is one native conversion (fp8 -> bf16 is
        # not), every E4M3/E5M2 value and probability is exact in fp16, and so is a bf16 query below 65504.
        # Measured on H200 (decode, batch 32, 8k context): 187 us against 262 us with bf16 operands.
        q_max = 65504.0 if fp8 and dot == tl.bfloat16 else 0.0
        dot = tl.float16 if q_max else dot
        # decode-like steps: 16-row tiles (the smallest tensor-core shape), 128-key tiles for FP8 (measured up to
        # 1.4x faster than 64), 64 for 16-bit; prefills: 128-row tiles (64 in fp32)
        block_m = 16 if max_q * group_p <= 16 else (64 if q.dtype == torch.float32 or d_p > 128 else 128)
        block_m = max(block_m, group_p)
        block_q = block_m // group_p
        tile_n = 32 if q.dtype == torch.float32 else (128 if fp8 and block_m == 16 else 64)
        warps, stages = (4 if block_m <= 64 else 8), (1 if interpreting() else 3)
        tuned = self.decode_launch if block_m == 16 else None
        if tuned:
            tile_n, warps, stages = tuned.tile_n, tuned.warps, tuned.stages
        tiles = num_tokens // block_q + num_seqs
        max_seq_len = meta.max_seq_len or max(meta.seq_lens_cpu)
        segments = _segments(num_seqs * layer.num_kv_heads, max_seq_len, tile_n, q.device) if block_m <= 16 else 1
        if tuned:
            segments = max(segments, tuned.min_segments)
        if segments > 1:
            part_acc = torch.empty(num_tokens * num_heads * segments, d_p, dtype=torch.float32, device=q.device)
            part_ml = torch.empty(num_tokens * num_heads * segments, 2, dtype=torch.float32, device=q.device)
        else:
            part_acc = part_ml = out
        window = layer.sliding_window
        dest = layer.out_dest
        permuted, dest = dest is not None, out if dest is None else dest
        _attention_kernel[(tiles, layer.num_kv_heads, segments)](
            out, dest, part_acc, part_ml, q, k_src, v_src, table, meta.query_start_loc, meta.seq_lens,
            layer.k_scale, layer.v_scale, layer.scale, num_seqs, window or 0,
            q.stride(0), q.stride(1), out.stride(0), stride_ks, stride_kh, stride_bt,
            H=num_heads, GROUP=group, GROUP_P=group_p, D=dim, D_P=d_p, PAGE=page, BLOCK_Q=block_q, TILE_N=tile_n,
            NUM_SEGMENTS=segments, PAGED=paged, FP8=fp8, SLIDING=window is not None, DOT=dot,
            PRECISION="ieee" if dot == tl.float32 else "tf32", Q_MAX=q_max,
            E5M2=paged and layer.kv_cache.dtype == torch.float8_e5m2, ASM=not interpreting(),
            PERMUTED=permuted, num_warps=warps,
            num_stages=stages, **launch_args(q.device, num_tokens))
        if segments > 1:
            _merge_segments_kernel[(num_tokens, num_heads)](
                out, dest, part_acc, part_ml, out.stride(0), H=num_heads, D=dim, D_P=d_p, NUM_SEGMENTS=segments,
                PERMUTED=permuted, **launch_args(q.device, num_tokens))
        return out
