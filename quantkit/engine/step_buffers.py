"""One step's model inputs in one preallocated staging buffer: the runner fills numpy views of pinned host memory
in place and a single non-blocking copy moves the used prefix to the device twin, where torch views at the same
offsets are the tensors the model reads. Layout for T tokens, B sequences and block-table width W:

    int64: input_ids[T] | positions[T] | slot_mapping[T] | placeholder_tokens[B] | placeholder_sources[B]
    int32: query_start_loc[B+1] | seq_lens[B] | block_tables[B, W]

The placeholder arrays serve async scheduling: the first entries name the input tokens not known on the host yet
(at most one per sequence) and their rows in the previous step's sampled ids, which fill them on the device.

Each section starts on a 16-byte boundary, as a fresh allocation would: Triton specializes kernels on pointer
alignment, and unaligned views would compile extra variants. The device buffer never moves, so a CUDA graph
captured on the views of one (T, B, W) reads whatever a later step copies there with the same layout."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

_ALIGN = 16  # bytes, each section's start


@dataclass
class StepViews:
    """Views of one layout: `host` numpy arrays to fill, `device` tensors to read, in the same order."""
    input_ids: tuple[np.ndarray, torch.Tensor]
    positions: tuple[np.ndarray, torch.Tensor]
    slot_mapping: tuple[np.ndarray, torch.Tensor]
    placeholder_tokens: tuple[np.ndarray, torch.Tensor]
    placeholder_sources: tuple[np.ndarray, torch.Tensor]
    query_start_loc: tuple[np.ndarray, torch.Tensor]
    seq_lens: tuple[np.ndarray, torch.Tensor]
    block_tables: tuple[np.ndarray, torch.Tensor]
    nbytes: int


def _layout(num_tokens: int, num_seqs: int, width: int) -> list[tuple[int, int, type]]:
    """(start, end) byte range and dtype of each array, in the order of StepViews."""
    out, offset = [], 0
    for count, dtype in [(num_tokens, np.int64)] * 3 + [(num_seqs, np.int64)] * 2 + [
            (num_seqs + 1, np.int32), (num_seqs, np.int32), (num_seqs * width, np.int32)]:
        end = offset + count * np.dtype(dtype).itemsize
        out.append((offset, end, dtype))
        offset = -(-end // _ALIGN) * _ALIGN
    return out


class StepBuffers:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device) -> None:
        self.max_tokens, self.max_seqs, self.max_blocks = max_tokens, max_seqs, max_blocks
        nbytes = _layout(max_tokens, max_seqs, max_blocks)[-1][1]
        self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
        # On CPU the model reads the host buffer itself: nothing to copy.
        self.device = self.host if device.type == "cpu" else torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self._host_np = self.host.numpy()
        self._copied: torch.cuda.Event | None = None
        # Steps repeat a few layouts (decode buckets above all): building the views costs more than filling them.
        self.views = functools.lru_cache(maxsize=256)(self._views)

    def _views(self, num_tokens: int, num_seqs: int, width: int) -> StepViews:
        if num_tokens > self.max_tokens or num_seqs > self.max_seqs or width > self.max_blocks:
            raise ValueError(f"a step of {num_tokens} tokens, {num_seqs} sequences and {width} blocks per sequence "
                             f"exceeds the staging buffer ({self.max_tokens}, {self.max_seqs}, {self.max_blocks})")
        layout = _layout(num_tokens, num_seqs, width)
        pairs = []
        for start, end, dtype in layout:
            pairs.append((self._host_np[start:end].view(dtype),
                          self.device[start:end].view(torch.int64 if dtype is np.int64 else torch.int32)))
        table_host, table_device = pairs[-1]
        pairs[-1] = (table_host.reshape(num_seqs, width), table_device.view(num_seqs, width))
        return StepViews(*pairs, nbytes=layout[-1][1])

    def wait_for_copy(self) -> None:
        """Call before refilling the host views: the previous step's copy may still be reading them."""
        if self._copied is not None:
            self._copied.synchronize()

    def copy_to_device(self, views: StepViews) -> None:
        if self.device is self.host:
            return
        self.device[:views.nbytes].copy_(self.host[:views.nbytes], non_blocking=True)
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.record()
