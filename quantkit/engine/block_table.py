"""The host copy of every scheduled request's block table: one persistent numpy row per request, updated in
place, so a step gathers its [B, W] table with one numpy take instead of converting B Python lists.

Only the entries from the block a step starts writing in can differ from the last sync: blocks are appended at
the end, and copy-on-write (a fork's shared, partly filled last block) replaces a block the step is about to
write. Blocks before it hold computed KV and never change while the request runs; a preemption drops them all,
which `Request.num_preemptions` tells."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantkit.engine.request import Request


@dataclass
class _Row:
    index: int
    num_synced: int        # entries of the row that mirror request.block_ids
    num_preemptions: int   # the request's count when the row was last written in full


class BlockTables:
    def __init__(self, max_rows: int, max_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.table = np.zeros((max_rows, max_blocks), dtype=np.int32)
        self._rows: dict[str, _Row] = {}
        self._free = list(range(max_rows - 1, -1, -1))

    @property
    def num_rows_in_use(self) -> int:
        return len(self._rows)

    def sync(self, request: Request, num_computed_tokens: int) -> int:
        """Brings the request's row up to date for a step that writes from `num_computed_tokens`; returns it."""
        blocks = request.block_ids
        if len(blocks) > self.max_blocks:
            raise ValueError(f"request {request.request_id!r} holds {len(blocks)} KV blocks, more than the "
                             f"{self.max_blocks} of max_model_len")
        row = self._rows.get(request.request_id)
        if row is None:
            row = self._rows[request.request_id] = _Row(self._take_row(), 0, request.num_preemptions)
        elif row.num_preemptions != request.num_preemptions:
            row.num_synced, row.num_preemptions = 0, request.num_preemptions
        first = min(row.num_synced, num_computed_tokens // self.block_size)
        self.table[row.index, first:len(blocks)] = blocks[first:]
        row.num_synced = len(blocks)
        return row.index

    def release(self, request_id: str) -> None:
        row = self._rows.pop(request_id, None)
        if row is not None:
            self._free.append(row.index)

    def _take_row(self) -> int:
        if not self._free:  # more unfinished requests were scheduled than rows: grow (rare, never on the hot path)
            grown = len(self.table)
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self._free = list(range(len(self.table) - 1, grown - 1, -1))
        return self._free.pop()
