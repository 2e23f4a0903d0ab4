"""Shared integer-quantization primitives: bit packing into int32 words, the AWQ nibble interleave, and
min/max group quantization (GPTQ quantizer conventions, FORMATS.md §1).

Packing is one rule for every width b in {2, 3, 4, 8}: the values along a dim form a dense little-endian bit
stream, value i occupying stream bits [b*i, b*i + b), cut into int32 words. For b dividing 32 this is plain
"32/b values per word, LSB-first"; for b = 3 it is exactly GPTQ's (and compressed-tensors') 3-words-per-32-values
scheme. A length whose bits do not fill the last word is zero-padded (compressed-tensors' ceil(K*b/32)).
Codes are unsigned, in [0, 2^b)."""
from __future__ import annotations

import sys
from math import gcd

import torch

SUPPORTED_BITS = (2, 3, 4, 8)

# AWQ GEMM: nibble slot i of a word holds logical column 8c + AWQ_ORDER[i]; AWQ_REVERSE_ORDER undoes it.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def packed_size(length: int, bits: int) -> int:
    """Number of int32 words holding `length` b-bit values: ceil(length * b / 32)."""
    return -(-length * bits // 32)


def _chunk(bits: int) -> tuple[int, int]:
    """(values, words) of the smallest run of values that fills whole words: (8, 1) for 4-bit, (32, 3) for 3."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{bits}-bit packing is not supported (supported: {SUPPORTED_BITS})")
    g = gcd(32, bits)
    return 32 // g, bits // g


def _pad_to_multiple(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """Zero-pad `dim` up to a multiple of `multiple` (no copy when it already is one)."""
    extra = -x.shape[dim] % multiple
    return torch.nn.functional.pad(x, [0, 0] * (x.dim() - dim - 1) + [0, extra]) if extra else x


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) -> int32 with the same bit pattern."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Unsigned b-bit integer codes (any int dtype) -> int32 words packed along `dim`; that dim's length L
    becomes packed_size(L, bits). Values outside [0, 2^b) raise."""
    n_vals, n_words = _chunk(bits)
    if values.numel() and (values.min() < 0 or values.max() >= 2 ** bits):
        raise ValueError(f"values to pack must lie in [0, {2 ** bits}); got "
                         f"[{values.min().item()}, {values.max().item()}]")
    dim = dim % values.dim()
    length = values.shape[dim]
    if n_words == 1 and sys.byteorder == "little":
        # b in {2, 4, 8}: 8/b values per byte, then 4 consecutive bytes viewed as one little-endian int32
        per_byte = 8 // bits
        v = _pad_to_multiple(values.to(torch.uint8), dim, n_vals).unflatten(dim, (-1, 4, per_byte))
        out = v.select(dim + 2, 0).clone()
        for j in range(1, per_byte):
            out |= v.select(dim + 2, j) << (j * bits)
        return out.movedim(dim + 1, -1).contiguous().view(torch.int32).squeeze(-1)
    # the general bit stream (b = 3: one 32-value run fills 3 words, values straddle word boundaries)
    v = _pad_to_multiple(values.to(torch.int64), dim, n_vals).unflatten(dim, (-1, n_vals))
    v = v.movedim(dim + 1, -1).movedim(dim, -2)
    words = v.new_zeros(*v.shape[:-1], n_words)
    for j in range(n_vals):
        w, s = divmod(j * bits, 32)
        words[..., w] += (v[..., j] << s) & 0xFFFFFFFF
        if s + bits > 32:
            words[..., w + 1] += v[..., j] >> (32 - s)
    words = words.flatten(-2)[..., :packed_size(length, bits)]
    return _to_int32(words).movedim(-1, dim).contiguous()


def unpack(words: torch.Tensor, bits: int, length: int, dim: int = -1) -> torch.Tensor:
    """int32 words packed along `dim` -> int32 codes in [0, 2^b), `length` of them along that dim."""
    n_vals, n_words = _chunk(bits)
    if words.shape[dim] != packed_size(length, bits):
        raise ValueError(f"{length} {bits}-bit values need {packed_size(length, bits)} words along dim {dim}, "
                         f"got {words.shape[dim]}")
    mask = 2 ** bits - 1
    dim = dim % words.dim()
    if n_words == 1:  # b divides 32: one broadcast shift, in place along `dim` (the hot path of apply)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
        shifts = shifts.view(-1, *([1] * (words.dim() - dim - 1)))
        out = ((words.unsqueeze(dim + 1) >> shifts) & mask).flatten(dim, dim + 1)
        return out.narrow(dim, 0, length).contiguous()
    # b = 3: values straddle words; walk one 32-value run (3 words) slot by slot
    w = words.movedim(dim, -1)
    u = _pad_to_multiple(w.to(torch.int64) & 0xFFFFFFFF, w.dim() - 1, n_words)
    u = u.unflatten(-1, (-1, n_words))
    parts = []
    for j in range(n_vals):
        k, s = divmod(j * bits, 32)
        part = u[..., k] >> s
        if s + bits > 32:
            part = part | (u[..., k + 1] << (32 - s))
        parts.append(part & mask)
    out = torch.stack(parts, -1).flatten(-2).to(torch.int32)
    return out[..., :length].movedim(-1, dim).contiguous()


def awq_interleave(codes: torch.Tensor) -> torch.Tensor:
    """Logical order -> AWQ GEMM slot order along the last dim (length a multiple of 8)."""
    return codes.unflatten(-1, (-1, 8))[..., list(AWQ_ORDER)].flatten(-2)


def awq_deinterleave(slots: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM slot order -> logical order along the last dim (inverse of awq_interleave)."""
    return slots.unflatten(-1, (-1, 8))[..., list(AWQ_REVERSE_ORDER)].flatten(-2)


def minmax_qparams(weight: torch.Tensor, bits: int, group_size: int,
                   sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ quantizer qparams per group of `group_size` inputs (-1 = all of K). weight [N, K] float ->
    (scales [N, G] float32, zeros [N, G] int32 unsigned codes), G = ceil(K / group_size). The range always
    includes 0; sym uses scale = 2*absmax/(2^b-1) and zero 2^(b-1); asym scale = (max-min)/(2^b-1),
    zero = round(-min/scale). An all-zero group gets the range [-1, 1] (as GPTQ does)."""
    k = weight.shape[1]
    g = k if group_size == -1 else group_size
    w = _pad_to_multiple(weight.float(), 1, g).unflatten(1, (-1, g))
    lo = w.amin(-1).clamp(max=0)
    hi = w.amax(-1).clamp(min=0)
    maxq = 2 ** bits - 1
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    scales = (hi - lo) / maxq
    zeros = torch.full_like(scales, (maxq + 1) // 2) if sym else torch.round(-lo / scales)
    return scales, zeros.to(torch.int32)


def quantize(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
             group_size: int) -> torch.Tensor:
    """weight [N, K] float, scales/zeros [N, G] -> codes [N, K] int32 = clamp(round(w/s) + z, 0, 2^b-1)."""
    k = weight.shape[1]
    g = k if group_size == -1 else group_size
    w = _pad_to_multiple(weight.float(), 1, g).unflatten(1, (-1, g))
    q = torch.round(w / scales.float()[..., None]) + zeros[..., None]
    return q.clamp_(0, 2 ** bits - 1).flatten(1)[:, :k].to(torch.int32)
