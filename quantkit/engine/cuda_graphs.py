"""Decode steps as CUDA graphs. A decode step of B sequences is padded to the smallest captured batch size
("bucket") N >= B and replays the graph captured for N: one launch instead of the hundreds of a layer-by-layer
forward, whose host time would otherwise exceed the GPU time of a small decode batch.

Padding rows are harmless by construction (the model runner fills them): slot -1, so the KV write skips them;
seq_len 1 over block table row zeros, so attention reads one key of block 0 (maybe another request's: reads do no
harm) and stays finite; token 0 at position 0. Their outputs are never read. Everything the graph launches is sized
by N and by `AttentionMetadata.max_seq_len` = max_model_len, never by one step's lengths.

Without capture (CPU, tests) the same padded batch runs eagerly: what a replay computes, testable anywhere."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every 8 up to 64 and every 16 beyond (vLLM's spacing), and max_num_seqs itself: padding
    wastes at most 15 rows. 16, 32, 64 and 256 are sizes (up to max_num_seqs), so padding never crosses a
    linear-kernel M bucket (kernels/base.py)."""
    steps = [1, 2, 4, *range(8, 65, 8), *range(80, max_num_seqs + 1, 16)]
    return sorted({n for n in steps if n < max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    """Bucket choice, and on CUDA one graph per bucket over a shared memory pool. `forward(n)` runs the model on
    the runner's static inputs of bucket n and returns its logits [n, vocab]."""

    def __init__(self, sizes: list[int], forward: Callable[[int], torch.Tensor]) -> None:
        if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"CUDA graph batch sizes must be distinct, ascending and >= 1, got {sizes}")
        self.sizes = sizes
        self._forward = forward
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_steps = 0  # decode steps served (replayed, or run padded when nothing is captured)

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest size >= num_seqs, or None if the batch is larger than every size."""
        return next((n for n in self.sizes if n >= num_seqs), None)

    def capture(self, device: torch.device, fill_padding: Callable[[int], None]) -> None:
        """Largest first, so the smaller graphs reuse the pool blocks the largest one allocated, its logits included:
        the others write theirs into its first rows, so the graphs hold one [max size, vocab] output between them
        (one per graph was the sum over sizes: 17 GB for the 71 sizes up to 1,024 sequences of a 128k vocabulary,
        an out-of-memory at capture). Each size runs once eagerly before its capture, on inputs that
        `fill_padding(n)` made all padding (no KV write): Triton compiles and any lazily sized workspace grows
        outside the graph."""
        # Cached blocks are released around the loop so the difference in free memory is what the graphs keep.
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        free_before, _ = torch.cuda.mem_get_info(device)
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        logits: torch.Tensor | None = None  # the largest graph's output; the others copy theirs into its rows
        for n in reversed(self.sizes):
            fill_padding(n)
            self._forward(n)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(n)
                if logits is None:
                    logits = out
                else:
                    logits[:n].copy_(out)
            del out  # a graph's own output goes back to the pool: every graph kept one (4.5 GB at 512 sequences)
            self._graphs[n] = (graph, logits[:n])
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        free_after, _ = torch.cuda.mem_get_info(device)
        logger.info("CUDA graphs: captured %d decode graphs for batch sizes %s in %.1f s; they took %.3f GB",
                    len(self._graphs), self.sizes, time.perf_counter() - start, (free_before - free_after) / 1e9)

    def run(self, n: int) -> torch.Tensor:
        """Logits [n, vocab] of bucket n's static inputs. A replay's output lives in the shared pool: read it
        before the next replay."""
        if n not in self.sizes:
            raise ValueError(f"{n} is not a CUDA graph batch size ({self.sizes})")
        self.num_steps += 1
        if not self._graphs:
            return self._forward(n)
        graph, out = self._graphs[n]
        graph.replay()
        return out
