"""Attention over a paged KV cache. The layer owns q/k/v -> output; a backend (chosen once, at construction)
owns the KV write and the attention math. The metadata describes one flattened step of mixed prefills/decodes."""
from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    """One per step. T = total new tokens, B = sequences.

    query_start_loc [B+1] int32: new tokens of sequence i are rows query_start_loc[i]:query_start_loc[i+1].
    seq_lens [B] int32: context length of sequence i after this step (cached prefix + new tokens).
    slot_mapping [T] int64: flat KV-pool slot (block_id * block_size + offset) per new token; -1 = don't write.
    block_tables [B, max_blocks] int32: the KV blocks of each sequence (padding past its length is ignored).
    None for slot_mapping/block_tables means "no KV cache": attend to the step's own tokens (a full prefill).
    The *_cpu lists mirror the tensors so host-side backends never sync on the device.
    max_seq_len: an upper bound on seq_lens that sizes kernel launches instead of max(seq_lens_cpu). A CUDA graph
    is captured once and replayed for every step of its batch size, so its launches must not depend on one
    step's lengths: it passes max_model_len (and then *_cpu describe the capture step only).
    """
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    max_seq_len: int | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @classmethod
    def for_prefill(cls, seq_lens: list[int], device: torch.device | str = "cpu") -> "AttentionMetadata":
        """Metadata for whole prompts with no cache (evaluation, reference comparisons)."""
        starts = [0]
        for n in seq_lens:
            starts.append(starts[-1] + n)
        return cls(query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
                   seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                   query_start_loc_cpu=starts, seq_lens_cpu=list(seq_lens))


class Attention(nn.Module):
    """Grouped-query attention of one layer. `kv_cache` ([2, num_blocks, block_size, kv_heads, head_dim]) is
    bound by the engine; `k_scale`/`v_scale` are the per-layer FP8 KV scales (1.0 for a 16-bit cache).
    `out_dest` (set by `write_output_in`, for an act-order o_proj) sends output column c to column out_dest[c]."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, sliding_window: int | None,
                 backend: "AttentionBackend") -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads "
                             f"({num_kv_heads})")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        self.backend = backend
        self.kv_cache: torch.Tensor | None = None
        self.register_buffer("k_scale", torch.ones(()), persistent=False)
        self.register_buffer("v_scale", torch.ones(()), persistent=False)
        self.register_buffer("out_dest", None, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] -> [T, H*D] (columns in `out_dest` order when it is set)."""
        out = self.backend.forward(self, q, k, v, meta).reshape(q.shape[0], -1)
        if self.out_dest is not None and not self.backend.writes_out_dest:
            out = torch.empty_like(out).index_copy_(1, self.out_dest, out)
        return out

    def write_output_in(self, order: torch.Tensor | None) -> None:
        """Output column j becomes column order[j] of the plain output (the input order of the act-order Linear
        that reads it); None keeps the plain order. Stored as the inverse, a scatter, which the kernels apply as
        they store: no gather launch. int64, the index type torch's scatter takes."""
        if order is None:
            self.out_dest = None
            return
        width = self.num_heads * self.head_dim
        if order.shape != (width,) or not torch.equal(order.sort().values.long(),
                                                      torch.arange(width, device=order.device)):
            raise ValueError(f"the output order must be a permutation of the {width} output columns, got "
                             f"{tuple(order.shape)}")
        dest = torch.empty(width, dtype=torch.int64, device=order.device)
        dest[order.long()] = torch.arange(width, device=order.device)
        self.out_dest = dest


class AttentionBackend:
    """Interface: write the step's K/V into `layer.kv_cache` at `meta.slot_mapping`, then attend."""
    name: str = "base"
    kv_cache_dtypes: tuple[torch.dtype, ...] = ()  # besides the model dtype
    # Safe inside a CUDA graph: no host syncs, and launches sized from tensor shapes, the query lengths of
    # `query_start_loc_cpu` and `meta.max_seq_len` alone, never from the values of `seq_lens_cpu`.
    cuda_graphs: bool = False
    writes_out_dest: bool = False  # stores output columns at `layer.out_dest` itself (else the layer scatters)

    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError


ATTENTION_BACKENDS = {"torch": "quantkit.kernels.attention_torch:TorchAttentionBackend",
                      "triton": "quantkit.kernels.attention_triton:TritonAttentionBackend"}
_override: str | None = None


def check_attention_backend_name(name: str | None) -> None:
    if name is not None and name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={name!r} is not a known backend (known: {', '.join(ATTENTION_BACKENDS)})")


@contextmanager
def use_attention_backend(name: str | None) -> Iterator[None]:
    """Force `name` (None: automatic choice) for the models built inside the block (benchmarks, tests)."""
    global _override
    check_attention_backend_name(name)
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def select_attention_backend(device: torch.device, name: str | None = None) -> AttentionBackend:
    """Chosen once per model: Triton on CUDA, the torch reference elsewhere (it serves every device and is the
    oracle the others are tested against). `name` (or `use_attention_backend`) forces one."""
    device, name = torch.device(device), name or _override
    check_attention_backend_name(name)
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"attention_backend='triton' needs a CUDA device (got {device}) or TRITON_INTERPRET=1")
    chosen = name or ("triton" if device.type == "cuda" else "torch")
    module, _, cls = ATTENTION_BACKENDS[chosen].partition(":")
    backend = getattr(importlib.import_module(module), cls)()
    logger.info("attention backend: %s on %s%s", chosen, device, " (forced)" if name else "")
    return backend
