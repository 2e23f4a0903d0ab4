"""Plain-torch paged attention: the reference every faster backend is compared with. Correct for prefills,
chunked prefills resuming mid-prompt, prefix-cached prompts and decodes in one mixed batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from quantkit.layers.attention import Attention, AttentionBackend, AttentionMetadata


def write_kv(layer: Attention, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter k/v [T, KVH, D] into the pool at flat slots; slot -1 is skipped. FP8 caches store x / scale."""
    cache = layer.kv_cache
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    flat = cache.view(2, -1, layer.num_kv_heads, layer.head_dim)
    if cache.element_size() == 1:
        fp8_max = torch.finfo(cache.dtype).max  # saturate: an out-of-range cast would give inf/NaN
        flat[0, slots] = (k[keep].float() / layer.k_scale).clamp(-fp8_max, fp8_max).to(cache.dtype)
        flat[1, slots] = (v[keep].float() / layer.v_scale).clamp(-fp8_max, fp8_max).to(cache.dtype)
    else:
        flat[0, slots] = k[keep].to(cache.dtype)
        flat[1, slots] = v[keep].to(cache.dtype)


def gather_kv(layer: Attention, block_table: torch.Tensor, seq_len: int, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [seq_len, KVH, D] of one sequence, read through its block table (dequantized)."""
    cache = layer.kv_cache
    block_size = cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    k = cache[0, blocks].reshape(-1, layer.num_kv_heads, layer.head_dim)[:seq_len]
    v = cache[1, blocks].reshape(-1, layer.num_kv_heads, layer.head_dim)[:seq_len]
    if cache.element_size() == 1:
        return (k.float() * layer.k_scale).to(dtype), (v.float() * layer.v_scale).to(dtype)
    return k.to(dtype), v.to(dtype)


def causal_mask(q_len: int, seq_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[q_len, seq_len] bool: query j sits at position seq_len - q_len + j and sees keys at or before it
    (and, with a sliding window, fewer than `window` positions back)."""
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Q, H, D], k/v [B, L, KVH, D], mask [B, Q, L] bool -> [B, Q, H, D], computed in fp32; each group of
    H/KVH query heads shares one kv head. torch's SDPA (its math or CPU flash kernel, exact softmax) rather than
    einsums: 5x faster on CPU, which calibration and evaluation feel."""
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2), attn_mask=mask[:, None], scale=scale,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2).to(q.dtype)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    kv_cache_dtypes = (torch.float8_e4m3fn, torch.float8_e5m2)

    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        use_cache = meta.slot_mapping is not None and layer.kv_cache is not None
        if use_cache:
            write_kv(layer, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        starts = meta.query_start_loc_cpu
        decodes = [i for i in range(meta.num_seqs) if starts[i + 1] - starts[i] == 1] if use_cache else []
        if decodes:
            self._decode(layer, q, meta, decodes, out)
        single = set(decodes)
        for i, seq_len in enumerate(meta.seq_lens_cpu):
            lo, hi = starts[i], starts[i + 1]
            if hi == lo or i in single:
                continue
            if use_cache:
                keys, values = gather_kv(layer, meta.block_tables[i], seq_len, q.dtype)
            else:
                keys, values = k[lo:hi], v[lo:hi]
            mask = causal_mask(hi - lo, seq_len, layer.sliding_window, q.device)
            out[lo:hi] = attend(q[None, lo:hi], keys[None], values[None], mask[None], layer.scale)[0]
        return out

    @staticmethod
    def _decode(layer: Attention, q: torch.Tensor, meta: AttentionMetadata, seqs: list[int],
                out: torch.Tensor) -> None:
        """All one-token queries at once: K/V gathered through the block tables and padded to the longest."""
        cache = layer.kv_cache
        block_size = cache.shape[2]
        lens = [meta.seq_lens_cpu[i] for i in seqs]
        width = -(-max(lens) // block_size)
        rows = torch.tensor(seqs, device=q.device)
        tables = meta.block_tables[rows, :width].long()
        keys = cache[0, tables].flatten(1, 2)
        values = cache[1, tables].flatten(1, 2)
        if cache.element_size() == 1:
            keys, values = keys.float() * layer.k_scale, values.float() * layer.v_scale
        positions = torch.arange(width * block_size, device=q.device)[None, :]
        seq_lens = torch.tensor(lens, device=q.device)[:, None]
        mask = positions < seq_lens
        if layer.sliding_window is not None:
            mask &= positions >= seq_lens - layer.sliding_window
        token_rows = torch.tensor([meta.query_start_loc_cpu[i] for i in seqs], device=q.device)
        out[token_rows] = attend(q[token_rows, None], keys, values, mask[:, None], layer.scale)[:, 0]
