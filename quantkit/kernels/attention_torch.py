"""Plain-torch paged attention: the reference every faster backend is compared with. Correct for prefills,
chunked prefills resuming mid-prompt, prefix-cached prompts and decodes in one mixed batch."""
from __future__ import annotations

import torch

from quantkit.layers.attention import Attention, AttentionBackend, AttentionMetadata


def write_kv(layer: Attention, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter k/v [T, KVH, D] into the pool at flat slots; slot -1 is skipped. FP8 caches store x / scale."""
    cache = layer.kv_cache
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    flat = cache.view(2, -1, layer.num_kv_heads, layer.head_dim)
    if cache.dtype.is_floating_point and cache.element_size() == 1:
        flat[0, slots] = (k[keep].float() / layer.k_scale).to(cache.dtype)
        flat[1, slots] = (v[keep].float() / layer.v_scale).to(cache.dtype)
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


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        use_cache = meta.slot_mapping is not None and layer.kv_cache is not None
        if use_cache:
            write_kv(layer, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        starts = meta.query_start_loc_cpu
        groups = layer.num_heads // layer.num_kv_heads
        for i, seq_len in enumerate(meta.seq_lens_cpu):
            lo, hi = starts[i], starts[i + 1]
            if hi == lo:
                continue
            if use_cache:
                keys, values = gather_kv(layer, meta.block_tables[i], seq_len, q.dtype)
            else:
                keys, values = k[lo:hi], v[lo:hi]
            mask = causal_mask(hi - lo, seq_len, layer.sliding_window, q.device)
            # [H, q_len, D] x [H, seq_len, D]; kv heads repeated for grouped-query attention.
            qi = q[lo:hi].transpose(0, 1)
            ki = keys.transpose(0, 1).repeat_interleave(groups, dim=0)
            vi = values.transpose(0, 1).repeat_interleave(groups, dim=0)
            scores = torch.matmul(qi.float(), ki.float().transpose(1, 2)) * layer.scale
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            out[lo:hi] = torch.matmul(probs, vi.float()).transpose(0, 1).to(q.dtype)
        return out
