"""Sizing and allocating the paged KV pool: one [2, num_blocks, block_size, kv_heads, head_dim] tensor per layer."""
from __future__ import annotations

import logging

import torch
from torch import nn

from quantkit.layers.attention import Attention
from quantkit.layers.transfer import to_device

logger = logging.getLogger(__name__)


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def bytes_per_block(model: nn.Module, block_size: int, kv_dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=kv_dtype).element_size()
    return sum(2 * block_size * a.num_kv_heads * a.head_dim * elem for a in attention_layers(model))


def allocate_kv_cache(model: nn.Module, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                      device: torch.device) -> None:
    for attn in attention_layers(model):
        attn.kv_cache = torch.zeros(2, num_blocks, block_size, attn.num_kv_heads, attn.head_dim,
                                    dtype=kv_dtype, device=device)
    ratio = 2 // torch.empty((), dtype=kv_dtype).element_size()
    logger.info("KV cache: %d blocks x %d tokens = %d tokens (%s, %.2f GB%s)", num_blocks, block_size,
                num_blocks * block_size, str(kv_dtype).removeprefix("torch."),
                num_blocks * bytes_per_block(model, block_size, kv_dtype) / 1e9,
                f"; {ratio}x the tokens of a 16-bit cache in the same memory" if ratio > 1 else "")


def copy_blocks(model: nn.Module, pairs: list[tuple[int, int]], device: torch.device) -> None:
    """Copy-on-write: duplicate the KV of block src into block dst in every layer."""
    if not pairs:
        return
    src = to_device([p[0] for p in pairs], device)
    dst = to_device([p[1] for p in pairs], device)
    for attn in attention_layers(model):
        attn.kv_cache[:, dst] = attn.kv_cache[:, src]
