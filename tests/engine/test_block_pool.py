"""BlockPool, FreeBlockQueue and KVCacheManager: LRU order, prefix hits, hash collisions, copy-on-write."""
import pytest

from quantkit.engine import block_pool
from quantkit.engine.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock
from quantkit.engine.kv_cache_manager import KVCacheManager
from quantkit.engine.request import Request
from quantkit.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=8))


def free_ids(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.free_queue]


def test_free_queue_popleft_append_remove():
    blocks = [KVCacheBlock(i) for i in range(4)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    assert [b.block_id for b in queue] == [0, 1, 3] and len(queue) == 3
    assert queue.popleft() is blocks[0]
    queue.append(blocks[0])
    queue.append(blocks[2])
    assert [b.block_id for b in queue] == [1, 3, 0, 2]
    with pytest.raises(ValueError, match="already in the free queue"):
        queue.append(blocks[1])
    queue.remove(blocks[1])
    with pytest.raises(ValueError, match="not in the free queue"):
        queue.remove(blocks[1])
    for _ in range(3):
        queue.popleft()
    with pytest.raises(ValueError, match="no free KV blocks"):
        queue.popleft()


def test_lru_eviction_frees_tail_first_and_evicts_on_reuse():
    pool = BlockPool(6)
    table = pool.get_new_blocks(3)
    tokens = list(range(12))
    hashes: list[bytes] = []
    pool.cache_full_blocks(table, tokens, 0, 3, 4, hashes)
    assert len(pool.cached) == 3 and pool.num_free_blocks == 3
    pool.free_blocks(table)
    # Never-used blocks first, then the table backwards: its last block is the first cached one to go.
    assert free_ids(pool) == [3, 4, 5, 2, 1, 0]
    assert all(b.ref_cnt == 0 for b in table)
    reused = pool.get_new_blocks(4)
    assert [b.block_id for b in reused] == [3, 4, 5, 2]
    assert pool.get_cached_block(hashes[2], tokens[8:12]) is None  # evicted
    assert pool.get_cached_block(hashes[0], tokens[0:4]) is table[0]  # survives, still free
    assert pool.get_cached_block(hashes[1], tokens[4:8]) is table[1]
    assert table[2].block_hash is None and table[2].token_ids is None


def test_touch_revives_free_cached_block_and_free_counts_refs():
    pool = BlockPool(3)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    pool.touch([block])
    assert block.ref_cnt == 1 and pool.num_free_blocks == 2 and block.block_id not in free_ids(pool)
    pool.touch([block])
    pool.free_blocks([block])
    assert block.ref_cnt == 1 and pool.num_free_blocks == 2
    pool.free_blocks([block])
    assert pool.num_free_blocks == 3
    with pytest.raises(ValueError, match="freed more often"):
        pool.free_blocks([block])
    with pytest.raises(ValueError, match="only 3 free"):
        pool.get_new_blocks(4)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)


def test_hash_chain_depends_on_prefix():
    a = block_pool.hash_block_tokens(None, [1, 2, 3, 4])
    assert a == block_pool.hash_block_tokens(None, [1, 2, 3, 4])
    assert a != block_pool.hash_block_tokens(None, [1, 2, 3, 5])
    b1 = block_pool.hash_block_tokens(a, [5, 6, 7, 8])
    b2 = block_pool.hash_block_tokens(block_pool.hash_block_tokens(None, [9, 9, 9, 9]), [5, 6, 7, 8])
    assert b1 != b2  # same block tokens, different prefix


def test_prefix_hit_shared_three_block_prefix():
    kv = KVCacheManager(num_blocks=16, block_size=16)
    prefix = list(range(100, 148))
    a = make_request("a", prefix + [1, 2, 3, 4, 5])
    assert kv.get_computed_blocks(a) == ([], 0)
    assert kv.allocate_slots(a, a.num_tokens)
    b = make_request("b", prefix + [7] * 20)
    blocks, num_cached = kv.get_computed_blocks(b)
    assert num_cached == 48 and [blk.block_id for blk in blocks] == a.block_ids[:3]
    assert kv.allocate_slots(b, b.num_tokens - 48, blocks)
    assert b.block_ids[:3] == a.block_ids[:3] and len(b.block_ids) == 5
    assert [kv.block_pool.blocks[i].ref_cnt for i in b.block_ids] == [2, 2, 2, 1, 1]
    # Lookups alone are not counted: the scheduler records a query when it admits the request.
    assert kv.block_pool.num_query_tokens == 0 and kv.block_pool.hit_rate == 0.0


def test_fully_cached_prompt_recomputes_last_block():
    kv = KVCacheManager(num_blocks=8, block_size=16)
    a = make_request("a", list(range(48)))
    assert kv.allocate_slots(a, 48)
    b = make_request("b", list(range(48)))
    blocks, num_cached = kv.get_computed_blocks(b)
    assert num_cached == 32 and len(blocks) == 2
    assert kv.allocate_slots(b, 16, blocks)
    # The recomputed last block is a new private block: the cache keeps a's copy (first one wins).
    assert b.block_ids[2] != a.block_ids[2]
    assert kv.block_pool.blocks[b.block_ids[2]].block_hash is None


def test_hash_collision_is_a_miss(monkeypatch):
    monkeypatch.setattr(block_pool, "hash_block_tokens", lambda parent, tokens: b"\x01" * 32)
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", [1, 2, 3, 4, 5])
    assert kv.allocate_slots(a, 5)
    assert len(kv.block_pool.cached) == 1
    b = make_request("b", [9, 9, 9, 9, 5])  # same (fake) hash, other tokens
    assert kv.get_computed_blocks(b) == ([], 0)
    c = make_request("c", [1, 2, 3, 4, 6])
    blocks, num_cached = kv.get_computed_blocks(c)
    assert num_cached == 4 and blocks[0].block_id == a.block_ids[0]


def test_failed_allocation_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    pool = kv.block_pool
    a = make_request("a", list(range(9)))
    assert kv.allocate_slots(a, 9)
    kv.free(a)
    assert free_ids(pool) == [3, 2, 1, 0] and a.block_ids == []
    c = make_request("c", [50] * 8)
    assert kv.allocate_slots(c, 8)  # takes blocks 3 and 2; cached 1, 0 stay free
    b = make_request("b", list(range(8)) + [60] * 9)
    blocks, num_cached = kv.get_computed_blocks(b)
    assert num_cached == 8
    # 2 revived hits + 3 new blocks > 2 free blocks: refused without touching the hits.
    assert not kv.allocate_slots(b, 9, blocks)
    assert b.block_ids == [] and [blk.ref_cnt for blk in blocks] == [0, 0]
    assert free_ids(pool) == [1, 0] and kv.num_free_blocks == 2
    assert kv.usage == pytest.approx(0.5)


def _forked_pair(kv: KVCacheManager, prompt_len: int) -> tuple[Request, Request]:
    parent = make_request("p", list(range(prompt_len)))
    assert kv.allocate_slots(parent, prompt_len)
    parent.num_computed_tokens = prompt_len
    parent.append_output_token(1000)
    child = make_request("p-1", list(range(prompt_len)))
    kv.fork(parent, child)
    child.num_computed_tokens = prompt_len
    child.append_output_token(2000)
    return parent, child


def test_fork_copies_only_the_shared_partial_block():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    parent, child = _forked_pair(kv, 10)
    blocks = kv.block_pool.blocks
    assert child.block_ids == parent.block_ids and len(parent.block_ids) == 3
    assert [blocks[i].ref_cnt for i in parent.block_ids] == [2, 2, 2]
    shared_last = parent.block_ids[2]
    assert kv.allocate_slots(parent, 1)
    assert parent.block_ids[:2] == child.block_ids[:2] and parent.block_ids[2] != shared_last
    assert kv.take_blocks_to_copy() == [(shared_last, parent.block_ids[2])]
    assert kv.take_blocks_to_copy() == []
    assert blocks[shared_last].ref_cnt == 1
    assert kv.allocate_slots(child, 1)  # now the sole owner: writes in place
    assert child.block_ids[2] == shared_last and kv.take_blocks_to_copy() == []
    assert [blocks[i].ref_cnt for i in parent.block_ids] == [2, 2, 1]


def test_fork_at_block_boundary_copies_nothing():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    parent, child = _forked_pair(kv, 8)
    assert kv.allocate_slots(parent, 1) and kv.allocate_slots(child, 1)
    assert kv.take_blocks_to_copy() == []
    assert parent.block_ids[:2] == child.block_ids[:2] and parent.block_ids[2] != child.block_ids[2]
    kv.free(parent)
    kv.free(child)
    assert kv.num_free_blocks == 16 and all(b.ref_cnt == 0 for b in kv.block_pool.blocks)


def test_copy_on_write_refused_when_pool_is_full():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    parent, child = _forked_pair(kv, 10)
    assert kv.num_free_blocks == 0
    assert not kv.allocate_slots(parent, 1)
    assert parent.block_ids == child.block_ids and kv.take_blocks_to_copy() == []
    with pytest.raises(ValueError, match="already has blocks"):
        kv.fork(parent, child)


def test_manager_errors_and_caching_off():
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(num_blocks=4, block_size=0)
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_caching=False)
    a = make_request("a", list(range(9)))
    assert kv.allocate_slots(a, 9)
    assert kv.block_pool.cached == {} and kv.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    with pytest.raises(ValueError, match="already has blocks"):
        kv.allocate_slots(a, 1, [kv.block_pool.blocks[3]])


def test_reset_prefix_cache_forgets_hits_only_when_idle():
    kv = KVCacheManager(num_blocks=8, block_size=16)
    a = make_request("a", list(range(40)))
    assert kv.allocate_slots(a, a.num_tokens)
    kv.block_pool.record_query(40, 0)
    with pytest.raises(RuntimeError, match="3 KV blocks are in use"):
        kv.block_pool.reset_prefix_cache()
    kv.free(a)
    kv.block_pool.reset_prefix_cache()
    assert not kv.block_pool.cached and kv.block_pool.num_query_tokens == 0
    assert kv.get_computed_blocks(make_request("b", list(range(40)))) == ([], 0)
