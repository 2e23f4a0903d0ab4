"""Scheduler against a fake model that keeps a simulated KV pool: every computed token is written into the
request's block table and sampling reads the context back from it, so a wrong block table, prefix hit, missing
copy-on-write or early free breaks the outputs (and the context check) instead of passing silently."""
import random

import pytest

from quantkit.engine.kv_cache_manager import KVCacheManager
from quantkit.engine.request import Request, RequestStatus
from quantkit.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from quantkit.sampling_params import SamplingParams


def next_token(context: list[int], index: int) -> int:
    return (sum((i + 1) * t for i, t in enumerate(context[-8:])) + 7 * len(context) + 13 * index) % 97 + 3


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.bs = block_size
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]

    def _slot(self, request: Request, pos: int) -> tuple[list[int | None], int]:
        return self.kv[request.block_ids[pos // self.bs]], pos % self.bs

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        for src, dst in out.blocks_to_copy:
            self.kv[dst] = list(self.kv[src])
        # Write every token first, as a real forward writes a layer's KV for the whole batch before attending.
        for item in out.scheduled:
            for pos in range(item.num_computed_tokens, item.num_computed_tokens + item.num_new_tokens):
                block, slot = self._slot(item.request, pos)
                block[slot] = item.request.all_token_ids[pos]
        sampled = {}
        for item in out.scheduled:
            end = item.num_computed_tokens + item.num_new_tokens
            context = [self._slot(item.request, p)[0][self._slot(item.request, p)[1]] for p in range(end)]
            assert context == item.request.all_token_ids[:end], f"corrupt KV for {item.request.request_id}"
            if item.sample:
                for seq in (item.request, *item.forks):
                    sampled[seq.request_id] = next_token(context, seq.index)
        return sampled


def make_request(rid: str, prompt: list[int], max_tokens: int = 8, n: int = 1) -> Request:
    params = SamplingParams(n=n, max_tokens=max_tokens)
    parent = Request(rid, list(prompt), params)
    parent.pending_forks = [Request(f"{rid}-{i}", list(prompt), params, index=i, parent_id=rid) for i in range(1, n)]
    return parent


def make(num_blocks: int = 64, caching: bool = True, **cfg) -> tuple[Scheduler, FakeRunner]:
    config = SchedulerConfig(**cfg)
    kv = KVCacheManager(num_blocks, config.block_size, enable_caching=caching)
    return Scheduler(config, kv), FakeRunner(num_blocks, config.block_size)


def step(sched: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    running_before = list(sched.running)
    out = sched.schedule()
    cfg = sched.config
    assert out.num_batched_tokens == sum(i.num_new_tokens for i in out.scheduled) <= cfg.max_num_batched_tokens
    assert all(i.num_new_tokens >= 1 for i in out.scheduled)
    # Running requests first (a prefix of the running list), all decodes but possibly the last; then admissions.
    requests = [i.request for i in out.scheduled]
    k = sum(r in running_before for r in requests)
    assert requests[:k] == running_before[:k] and not set(requests[k:]) & set(running_before)
    assert all(i.num_new_tokens == 1 and i.num_computed_tokens >= i.request.num_prompt_tokens
               for i in out.scheduled[:max(k - 1, 0)])
    sched.update(out, runner.execute(out))
    assert sched.num_running <= cfg.max_num_seqs
    return out


def run(sched: Scheduler, runner: FakeRunner, max_steps: int = 2000) -> int:
    steps = 0
    while sched.has_unfinished_requests():
        step(sched, runner)
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return steps


def all_seqs(requests: list[Request]) -> list[Request]:
    return [seq for r in requests for seq in (r, *r.pending_forks)]


def assert_pool_clean(sched: Scheduler) -> None:
    pool = sched.kv.block_pool
    assert sched.kv.num_free_blocks == pool.num_blocks == len(list(pool.free_queue))
    assert all(b.ref_cnt == 0 for b in pool.blocks)
    assert not sched.running and not sched.waiting and sched.get_num_unfinished_requests() == 0
    assert not sched.kv._states  # per-request hash memos are dropped with the request


def test_fcfs_order_with_one_seq():
    sched, runner = make(max_num_seqs=1)
    reqs = [make_request(name, [i + 1] * 5, max_tokens=3) for i, name in enumerate("abc")]
    for r in reqs:
        sched.add_request(r)
    finished = []
    while sched.has_unfinished_requests():
        out = step(sched, runner)
        assert len(out.scheduled) == 1
        finished += [i.request.request_id for i in out.scheduled if i.request.is_finished]
    assert finished == ["a", "b", "c"]
    times = [r.metrics.first_scheduled_time for r in reqs]
    assert times == sorted(times) and all(r.status is RequestStatus.FINISHED_LENGTH for r in reqs)
    assert [r.num_output_tokens for r in reqs] == [3, 3, 3]


def test_budget_and_seq_cap_hold_every_step():
    sched, runner = make(max_num_seqs=3, max_num_batched_tokens=20, block_size=4)
    rng = random.Random(1)
    reqs = [make_request(f"r{i}", [rng.randrange(50) for _ in range(rng.randrange(5, 40))]) for i in range(10)]
    for r in reqs:
        sched.add_request(r)
    peak = 0
    while sched.has_unfinished_requests():
        out = step(sched, runner)
        peak = max(peak, len(out.scheduled))
    assert peak == 3 and all(r.num_output_tokens == 8 for r in reqs)


def test_chunked_prefill_splits_prompt_and_puts_decodes_first():
    sched, runner = make(max_num_batched_tokens=32, max_num_seqs=4)
    a, b = make_request("a", [1] * 8, max_tokens=10), make_request("b", list(range(100)), max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    shapes = []
    for _ in range(4):
        out = step(sched, runner)
        shapes.append([(i.request.request_id, i.num_computed_tokens, i.num_new_tokens, i.sample)
                       for i in out.scheduled])
    assert shapes == [
        [("a", 0, 8, True), ("b", 0, 24, False)],
        [("a", 8, 1, True), ("b", 24, 31, False)],
        [("a", 9, 1, True), ("b", 55, 31, False)],
        [("a", 10, 1, True), ("b", 86, 14, True)],
    ]
    assert b.num_output_tokens == 1


def test_without_chunking_a_long_prompt_waits_for_budget():
    sched, runner = make(enable_chunked_prefill=False, max_num_batched_tokens=64, max_model_len=64, max_num_seqs=4)
    a, b = make_request("a", [1] * 8, max_tokens=5), make_request("b", list(range(64)))
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(5):
        out = step(sched, runner)
        assert [i.request for i in out.scheduled] == [a] and b.status is RequestStatus.WAITING
    assert a.is_finished
    out = step(sched, runner)
    assert [(i.request, i.num_new_tokens, i.sample) for i in out.scheduled] == [(b, 64, True)]
    assert b.status is RequestStatus.FINISHED_LENGTH  # prompt == max_model_len: one token, then length


def test_preemption_takes_latest_admitted_and_requeues_it_first():
    sched, runner = make(num_blocks=5, block_size=4, max_num_batched_tokens=64, max_num_seqs=4)
    a, b, c = (make_request(name, [i] * 8, max_tokens=10) for i, name in enumerate("abc", 1))
    for r in (a, b, c):
        sched.add_request(r)
    step(sched, runner)
    assert [r.request_id for r in sched.running] == ["a", "b"] and sched.kv.num_free_blocks == 1
    first_scheduled = b.metrics.first_scheduled_time
    out = step(sched, runner)  # a takes the last block; b must go, and nothing is admitted in its place
    assert [i.request for i in out.scheduled] == [a] and out.preempted == [b]
    assert list(sched.waiting) == [b, c] and b.status is RequestStatus.PREEMPTED and c.status is RequestStatus.WAITING
    assert (b.num_computed_tokens, b.block_ids, b.num_preemptions, sched.num_preemptions_total) == (0, [], 1, 1)
    assert sched.prefix_cache_query_tokens == 2 * 8  # step 1's two admissions only: none after a preemption
    run(sched, runner)
    assert [r.num_output_tokens for r in (a, b, c)] == [10, 10, 10]
    assert b.output_token_ids[0] == next_token([2] * 8, 0)
    # Readmission found b's blocks in the cache, but the request-level facts are those of the first admission.
    assert b.metrics.first_scheduled_time == first_scheduled and b.num_cached_tokens == 0


def _workload() -> list[Request]:
    rng = random.Random(7)
    shared = [rng.randrange(90) for _ in range(12)]
    reqs = [make_request(f"r{i}", shared[:rng.randrange(12)] + [rng.randrange(90) for _ in range(rng.randrange(3, 16))],
                         max_tokens=rng.randrange(4, 20)) for i in range(8)]
    reqs.append(make_request("forked", shared + [5], max_tokens=12, n=3))
    return reqs


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_on_tiny_pool_gives_same_outputs(caching):
    outputs = {}
    for num_blocks in (200, 12):
        sched, runner = make(num_blocks, caching=caching, block_size=4, max_num_batched_tokens=24, max_num_seqs=8)
        reqs = _workload()
        seqs = all_seqs(reqs)
        for r in reqs:
            sched.add_request(r)
        run(sched, runner)
        outputs[num_blocks] = {s.request_id: s.output_token_ids for s in seqs}
        assert all(s.is_finished for s in seqs)
        assert (sched.num_preemptions_total > 0) == (num_blocks == 12)
        assert_pool_clean(sched)
    assert outputs[12] == outputs[200]
    assert len(set(map(tuple, (outputs[12][f"forked{s}"] for s in ("", "-1", "-2"))))) == 3


def test_prefix_cache_hits_through_the_scheduler():
    sched, runner = make()
    prefix = list(range(1, 49))
    a = make_request("a", prefix + [60] * 8, max_tokens=2)
    sched.add_request(a)
    run(sched, runner)
    b, c = make_request("b", prefix + [70] * 10, max_tokens=2), make_request("c", prefix, max_tokens=2)
    sched.add_request(b)
    sched.add_request(c)
    out = step(sched, runner)
    assert [(i.request, i.num_computed_tokens, i.num_new_tokens) for i in out.scheduled] == [(b, 48, 10), (c, 32, 16)]
    assert (b.num_cached_tokens, c.num_cached_tokens) == (48, 32)
    assert sched.prefix_cache_query_tokens == 56 + 58 + 48 and sched.prefix_cache_hit_tokens == 80
    assert sched.prefix_cache_hit_rate == pytest.approx(80 / 162)
    run(sched, runner)
    assert c.output_token_ids[0] == next_token(prefix, 0)


def test_fork_copies_partial_block_never_full_ones():
    sched, runner = make(block_size=16)
    p, q = make_request("p", list(range(20)), max_tokens=4, n=3), make_request("q", [7] * 5, max_tokens=4)
    children = list(p.pending_forks)
    sched.add_request(p)
    sched.add_request(q)
    out = step(sched, runner)
    assert out.scheduled[0].forks == children and out.scheduled[1].forks == [] and out.blocks_to_copy == []
    assert [r.request_id for r in sched.running] == ["p", "p-1", "p-2", "q"]
    assert all(c.block_ids == p.block_ids for c in children) and not p.pending_forks
    full, partial = p.block_ids
    out = step(sched, runner)
    # p and p-1 copy the shared partial block; p-2, the last holder, writes in place.
    assert [src for src, _ in out.blocks_to_copy] == [partial, partial]
    assert all(seq.block_ids[0] == full for seq in (p, *children)) and children[1].block_ids[1] == partial
    run(sched, runner)
    assert [s.num_output_tokens for s in (p, *children)] == [4, 4, 4]
    assert_pool_clean(sched)


def test_pending_forks_reserve_sequence_slots():
    sched, runner = make(max_num_seqs=3, max_num_batched_tokens=64)
    p, q = make_request("p", list(range(40)), max_tokens=3, n=3), make_request("q", [1] * 5)
    sched.add_request(p)
    sched.add_request(q)
    step(sched, runner)
    assert sched.num_running == 3 and q.metrics.first_scheduled_time is None
    run(sched, runner)
    assert q.num_output_tokens == 8
    with pytest.raises(ValueError, match="max_num_seqs"):
        sched.add_request(make_request("big", [1] * 5, n=4))


def test_aborts_free_blocks_everywhere():
    sched, runner = make(max_num_batched_tokens=32, max_num_seqs=8, block_size=4)
    run_, wait = make_request("run", [1] * 10), make_request("wait", [2] * 10)
    parent = make_request("par", [3] * 60, n=3)
    for r in (run_, parent, wait):
        sched.add_request(r)
    step(sched, runner)  # run prefills; par takes the rest of the budget (chunk); wait waits
    assert parent.status is RequestStatus.RUNNING and wait.status is RequestStatus.WAITING
    children = list(parent.pending_forks)
    sched.finish_requests([children[0].request_id], RequestStatus.FINISHED_ABORTED)
    assert parent.pending_forks == [children[1]] and children[0].status is RequestStatus.FINISHED_ABORTED
    sched.finish_requests(["wait", "no-such-id"], RequestStatus.FINISHED_ABORTED)
    out = sched.schedule()
    sampled = runner.execute(out)
    sched.finish_requests("run", RequestStatus.FINISHED_STOPPED)  # e.g. a stop string, during the forward
    got = sched.update(out, sampled)
    assert run_ not in got and run_.status is RequestStatus.FINISHED_STOPPED and run_.block_ids == []
    sched.finish_requests("par", RequestStatus.FINISHED_ABORTED)
    assert children[1].status is RequestStatus.FINISHED_ABORTED and wait.status is RequestStatus.FINISHED_ABORTED
    assert_pool_clean(sched)
    with pytest.raises(ValueError, match="FINISHED_"):
        sched.finish_requests("x", RequestStatus.RUNNING)


def _check_refs(sched: Scheduler) -> None:
    pool = sched.kv.block_pool
    refs = [0] * pool.num_blocks
    for r in sched.requests.values():
        for block_id in r.block_ids:
            refs[block_id] += 1
    assert refs == [b.ref_cnt for b in pool.blocks]
    assert {b.block_id for b in pool.free_queue} == {i for i, n in enumerate(refs) if n == 0}


@pytest.mark.parametrize("seed,chunked", [(0, True), (1, False), (2, True)])
def test_random_operations_leave_no_leak(seed, chunked):
    rng = random.Random(seed)
    sched, runner = make(40, block_size=4, max_num_seqs=6, max_num_batched_tokens=64, max_model_len=64,
                         enable_chunked_prefill=chunked)
    shared = [rng.randrange(90) for _ in range(16)]
    counter = 0
    for _ in range(200):
        op = rng.random()
        ids = list(sched.requests)
        if op < 0.3:
            counter += 1
            prompt = shared[:rng.randrange(17)] + [rng.randrange(90) for _ in range(rng.randrange(1, 20))]
            sched.add_request(make_request(f"q{counter}", prompt, rng.randrange(1, 20), n=rng.choice([1, 1, 2, 3])))
        elif op < 0.4 and ids:
            sched.finish_requests(rng.choice(ids), RequestStatus.FINISHED_ABORTED)
        elif op < 0.45 and sched.running:
            sched.finish_requests(rng.choice(sched.running).request_id, RequestStatus.FINISHED_STOPPED)
        else:
            step(sched, runner)
        _check_refs(sched)
    assert sched.prefix_cache_hit_tokens > 0
    sched.finish_requests(list(sched.requests), RequestStatus.FINISHED_ABORTED)
    assert_pool_clean(sched)
    assert sched.kv.usage == 0.0


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens.*max_model_len"):
        SchedulerConfig(enable_chunked_prefill=False, max_num_batched_tokens=512, max_model_len=1024)
    with pytest.raises(ValueError, match="max_num_batched_tokens.*max_num_seqs"):
        SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=32)
    with pytest.raises(ValueError, match="block_size"):
        Scheduler(SchedulerConfig(block_size=16), KVCacheManager(8, 8))


def test_add_request_and_update_errors_name_the_request():
    sched, runner = make(num_blocks=4, block_size=4, max_model_len=32)
    with pytest.raises(ValueError, match="'long'.*max_model_len"):
        sched.add_request(make_request("long", [1] * 33))
    with pytest.raises(ValueError, match="'huge'.*5 KV blocks.*only 4"):
        sched.add_request(make_request("huge", [1] * 10, max_tokens=10))
    with pytest.raises(ValueError, match="'empty'.*empty prompt"):
        sched.add_request(make_request("empty", []))
    sched.add_request(make_request("ok", [1] * 4, max_tokens=4))
    with pytest.raises(ValueError, match="'ok'.*already in use"):
        sched.add_request(make_request("ok", [1] * 4))
    out = sched.schedule()
    with pytest.raises(ValueError, match="'ok'"):
        sched.update(out, {})
    request = out.scheduled[0].request  # nothing half-applied: the schedule's placeholder is still there
    assert request.num_computed_tokens == 4 and request.num_output_placeholders == 1 and not request.output_token_ids
    sched.update(out, runner.execute(out))
    assert out.scheduled[0].request.num_output_tokens == 1
