"""Physical KV blocks, the LRU free queue and the prefix cache (hash of a full block -> the block holding its KV).

A block is "cached" when it is full and registered under the chained hash of its tokens. Freeing a cached
block keeps it in the hash map; it is only evicted when the free queue hands it out again, so a later request
with the same prefix can revive it with `touch` for free.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

_ROOT_HASH = bytes(32)


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """sha256(parent hash || int64 token ids).

    sha256 rather than Python's tuple hash: the cache is shared by every request (every user of a server), and
    the tuple hash is not collision resistant, so a crafted prompt could be made to collide with someone else's
    prefix and read their KV. sha256 costs about a microsecond per full block, once per block. The parent is
    the 32-byte root for the first block, so every input has the same layout and no two inputs alias."""
    digest = hashlib.sha256(parent_hash or _ROOT_HASH)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def extend_block_hashes(hashes: list[bytes], token_ids: Sequence[int], num_blocks: int, block_size: int) -> None:
    """Grows `hashes` (the chain of a request's full blocks, memoised per request) to `num_blocks` entries."""
    for i in range(len(hashes), num_blocks):
        parent = hashes[i - 1] if i else None
        hashes.append(hash_block_tokens(parent, token_ids[i * block_size:(i + 1) * block_size]))


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    # The tokens whose KV the block holds, kept for cached blocks so a hash hit can be verified.
    token_ids: tuple[int, ...] | None = None
    prev_free: KVCacheBlock | None = field(default=None, repr=False)
    next_free: KVCacheBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Doubly linked list of free blocks threaded through the blocks themselves, so popleft, append and
    removing a block from the middle (a prefix hit on a free cached block) are all O(1)."""

    def __init__(self, blocks: Sequence[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)  # sentinels: no None checks at the ends
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVCacheBlock]:
        node = self._head.next_free
        while node is not self._tail:
            yield node
            node = node.next_free

    def popleft(self) -> KVCacheBlock:
        if self._len == 0:
            raise ValueError("no free KV blocks left")
        block = self._head.next_free
        self.remove(block)
        return block

    def append(self, block: KVCacheBlock) -> None:
        if block.prev_free is not None:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        last = self._tail.prev_free
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self._len += 1

    def remove(self, block: KVCacheBlock) -> None:
        if block.prev_free is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self._len -= 1


class BlockPool:
    """Owns every KVCacheBlock: allocation, reference counts, the free queue and the prefix-cache map."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, KVCacheBlock] = {}
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def hit_rate(self) -> float:
        """Fraction of looked-up tokens served by the prefix cache."""
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0

    def reset_prefix_cache(self) -> None:
        """Forgets every cached block and the hit counters. Only while no request holds a block."""
        if self.num_free_blocks != self.num_blocks:
            raise RuntimeError(f"reset_prefix_cache: {self.num_blocks - self.num_free_blocks} KV blocks are in use")
        for block in self.blocks:
            self._evict(block)
        self.num_query_tokens = self.num_hit_tokens = 0

    def record_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.num_query_tokens += num_query_tokens
        self.num_hit_tokens += num_hit_tokens

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Pops `n` blocks from the LRU head with ref_cnt 1; a cached block loses its hash here (eviction)."""
        if n > self.num_free_blocks:
            raise ValueError(f"cannot allocate {n} KV blocks: only {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None and self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
        block.block_hash = None
        block.token_ids = None

    def free_blocks(self, blocks: Sequence[KVCacheBlock]) -> None:
        """Drops one reference from each block of a block table. Walks the table backwards so the tail
        blocks (the least shareable: only a prompt with the same long prefix can reuse them) reach the
        free queue first and are evicted before the head blocks."""
        for block in reversed(blocks):
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more often than allocated")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def touch(self, blocks: Sequence[KVCacheBlock]) -> None:
        """Takes a reference on shared blocks (prefix hits, forks); a free cached block leaves the queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def get_cached_block(self, block_hash: bytes, token_ids: Sequence[int]) -> KVCacheBlock | None:
        """The block cached under `block_hash`, only if it really holds `token_ids` (a collision is a miss)."""
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def cache_full_blocks(self, request_blocks: Sequence[KVCacheBlock], token_ids: Sequence[int],
                          num_cached_before: int, num_full_after: int, block_size: int,
                          block_hashes: list[bytes]) -> None:
        """Registers blocks [num_cached_before, num_full_after) of a request's table, whose tokens are all
        scheduled, under their chained hashes (`block_hashes` is the request's memoised chain, extended here).
        A block whose hash is already cached by another block stays private: the first copy wins."""
        if not self.enable_caching:
            return
        extend_block_hashes(block_hashes, token_ids, num_full_after, block_size)
        for i in range(num_cached_before, num_full_after):
            block, block_hash = request_blocks[i], block_hashes[i]
            if block.block_hash is not None or block_hash in self.cached:
                continue
            block.block_hash = block_hash
            block.token_ids = tuple(token_ids[i * block_size:(i + 1) * block_size])
            self.cached[block_hash] = block
