"""Block tables of requests over the BlockPool: prefix-cache lookup at admission, slot allocation per step,
copy-on-write for n > 1 forks. Works on `Request.block_ids` and never moves KV itself: the copies it decides
are handed to the model runner through `take_blocks_to_copy()`."""
from __future__ import annotations

from dataclasses import dataclass, field

from quantkit.engine.block_pool import BlockPool, KVCacheBlock, extend_block_hashes
from quantkit.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


@dataclass
class _CacheState:
    """Per-request memo: the chained hashes of its full blocks, and how many table blocks went through
    `cache_full_blocks` already, so each step hashes only the blocks it has just filled."""
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self._states: dict[str, _CacheState] = {}
        self._blocks_to_copy: list[tuple[int, int]] = []

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request (free cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _state(self, request: Request) -> _CacheState:
        state = self._states.get(request.request_id)
        if state is None:
            state = self._states[request.request_id] = _CacheState()
        return state

    def _table(self, request: Request) -> list[KVCacheBlock]:
        return [self.block_pool.blocks[i] for i in request.block_ids]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest chain of cached full blocks of `request.all_token_ids`. It stops short of the last token
        (if everything is cached the last block is recomputed) because the step must produce logits to sample."""
        if not self.enable_caching:
            return [], 0
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        hashes = self._state(request).block_hashes
        extend_block_hashes(hashes, request.all_token_ids, max_blocks, bs)
        hits: list[KVCacheBlock] = []
        for i in range(max_blocks):
            block = self.block_pool.get_cached_block(hashes[i], request.all_token_ids[i * bs:(i + 1) * bs])
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * bs

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVCacheBlock] | None = None) -> bool:
        """Makes the table cover `num_computed_tokens + num_new_tokens` tokens (after prepending
        `computed_blocks`, the prefix hits of an admission). Returns False and changes nothing when the pool
        is short. Shared blocks about to be written are copied first (copy-on-write)."""
        computed = computed_blocks or []
        ids = request.block_ids
        if computed and ids:
            raise ValueError(f"request {request.request_id!r}: prefix hits given but it already has blocks")
        pool, bs = self.block_pool, self.block_size
        start = request.num_computed_tokens + len(computed) * bs
        end = start + num_new_tokens
        # Only the blocks this step writes into are looked at: a decode costs O(1), not O(table length).
        cow = [i for i in range(start // bs, len(ids)) if pool.blocks[ids[i]].ref_cnt > 1]
        num_new_blocks = max(0, cdiv(end, bs) - len(ids) - len(computed))
        # Hits that sit in the free queue stop being free once touched.
        num_revived = sum(1 for block in computed if block.ref_cnt == 0) if computed else 0
        if num_new_blocks + len(cow) + num_revived > pool.num_free_blocks:
            return False

        if computed:  # the table is empty (checked above): it starts with the hits
            pool.touch(computed)
            ids = request.block_ids = [block.block_id for block in computed]
        for i in cow:
            ids[i] = self._copy_on_write(pool.blocks[ids[i]]).block_id
        if num_new_blocks:
            ids += [block.block_id for block in pool.get_new_blocks(num_new_blocks)]
        if self.enable_caching and end // bs > self._state(request).num_cached_blocks:  # most decodes fill none
            self._cache_full_blocks(request, end)
        return True

    def cache_blocks(self, request: Request) -> None:
        """Caches the blocks that were filled up to a placeholder token, now that its token is known (async
        scheduling hashes a block only once all of its tokens are)."""
        if self.enable_caching and request.block_ids:
            self._cache_full_blocks(request, request.num_computed_tokens)

    def _cache_full_blocks(self, request: Request, num_scheduled_tokens: int) -> None:
        """Registers the request's blocks that are full of scheduled, known tokens in the prefix cache."""
        state = self._state(request)
        num_full = min(num_scheduled_tokens, len(request.all_token_ids)) // self.block_size
        if num_full > state.num_cached_blocks:
            self.block_pool.cache_full_blocks(self._table(request), request.all_token_ids, state.num_cached_blocks,
                                              num_full, self.block_size, state.block_hashes)
            state.num_cached_blocks = num_full

    def _copy_on_write(self, src: KVCacheBlock) -> KVCacheBlock:
        dst = self.block_pool.get_new_blocks(1)[0]
        self.block_pool.free_blocks([src])  # drops only this request's reference: src is still shared
        self._blocks_to_copy.append((src.block_id, dst.block_id))
        return dst

    def take_blocks_to_copy(self) -> list[tuple[int, int]]:
        """(src, dst) block pairs the model runner must copy before this step's forward; clears the list."""
        out, self._blocks_to_copy = self._blocks_to_copy, []
        return out

    def fork(self, parent: Request, child: Request) -> None:
        """The child shares every block of the parent (one more reference each); the first write into the
        shared, not yet full, last block triggers a copy in `allocate_slots`."""
        if child.block_ids:
            raise ValueError(f"fork child {child.request_id!r} already has blocks")
        table = self._table(parent)
        self.block_pool.touch(table)
        child.block_ids = list(parent.block_ids)
        if self.enable_caching:
            state = self._state(parent)
            self._states[child.request_id] = _CacheState(state.block_hashes[:state.num_cached_blocks],
                                                         state.num_cached_blocks)

    def free(self, request: Request) -> None:
        """Releases every block of the request (finish, abort, preemption) and forgets its hash memo."""
        self.block_pool.free_blocks(self._table(request))
        request.block_ids = []
        self._states.pop(request.request_id, None)
