"""Continuous batching: each step picks which tokens of which requests to compute, under a token budget and a
sequence cap, with chunked prefill, prefix caching, preemption by recompute and n > 1 forks.

One rule everywhere: a request computes `all_token_ids[num_computed_tokens:]`, and the chunk that reaches
`num_tokens` samples. Prefill, a prefill chunk, recompute after preemption and decode differ only in length.

Scheduling a step advances `num_computed_tokens` and gives each sampling request a placeholder token, which
`update` replaces with the sampled one. So the next step can be scheduled before this one's tokens are known
(async scheduling): a request then decodes its placeholder, unless the placeholders alone finish it.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from quantkit.engine.kv_cache_manager import KVCacheManager, cdiv
from quantkit.engine.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    block_size: int = 16

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}")
        # Every running sequence decodes one token per step; a smaller budget would starve the last ones.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"SchedulerConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                             f">= max_num_seqs ({self.max_num_seqs})")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"SchedulerConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                             f">= max_model_len ({self.max_model_len}) when enable_chunked_prefill is False, "
                             "or the longest prompt could never be scheduled")


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int        # computes all_token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]
    num_computed_tokens: int   # start position of this chunk
    sample: bool               # the chunk reaches request.num_tokens: sample from its last row
    forks: list[Request] = field(default_factory=list)  # n > 1 children sampling from the same logits row


@dataclass
class SchedulerOutput:
    # Running requests in admission order, then admissions. The running part is all decodes except at most
    # its last item: a prefill chunk only stays partial by using up the budget, and then nothing is admitted.
    scheduled: list[ScheduledRequest]
    blocks_to_copy: list[tuple[int, int]]    # copy-on-write, applied before the forward
    num_batched_tokens: int
    preempted: list[Request]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        if kv_cache_manager.block_size != config.block_size:
            raise ValueError(f"SchedulerConfig.block_size ({config.block_size}) differs from the KV cache "
                             f"manager's block_size ({kv_cache_manager.block_size})")
        self.config = config
        self.kv = kv_cache_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last one is preempted first
        self.requests: dict[str, Request] = {}  # every unfinished request, pending fork children included
        self._fork_parents: dict[str, Request] = {}  # pending fork child id -> parent
        self.num_preemptions_total = 0

    # ---- admission and aborts -------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queues a request (FCFS). Its `pending_forks` ride along until its prompt is computed."""
        self._validate(request)
        for seq in (request, *request.pending_forks):
            if seq.max_model_len is None:
                seq.max_model_len = self.config.max_model_len
            self.requests[seq.request_id] = seq
        for child in request.pending_forks:
            self._fork_parents[child.request_id] = request
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def _validate(self, request: Request) -> None:
        rid, cfg = request.request_id, self.config
        ids = [request.request_id] + [c.request_id for c in request.pending_forks]
        if len(set(ids)) != len(ids) or any(i in self.requests for i in ids):
            raise ValueError(f"request id {rid!r} (or one of its fork ids {ids[1:]}) is already in use")
        if request.num_prompt_tokens == 0:
            raise ValueError(f"request {rid!r} has an empty prompt")
        if request.num_tokens > cfg.max_model_len:
            raise ValueError(f"request {rid!r}: prompt of {request.num_tokens} tokens exceeds "
                             f"max_model_len={cfg.max_model_len}")
        if 1 + len(request.pending_forks) > cfg.max_num_seqs:
            raise ValueError(f"request {rid!r} asks for {1 + len(request.pending_forks)} sequences but "
                             f"max_num_seqs={cfg.max_num_seqs}")
        max_tokens = request.sampling_params.max_tokens
        max_len = cfg.max_model_len if max_tokens is None else min(request.num_tokens + max_tokens,
                                                                   cfg.max_model_len)
        if cdiv(max_len, cfg.block_size) > self.kv.num_blocks:
            raise ValueError(f"request {rid!r} may reach {max_len} tokens = {cdiv(max_len, cfg.block_size)} KV "
                             f"blocks, but the pool has only {self.kv.num_blocks}: it could never be scheduled")

    def finish_requests(self, request_ids: str | list[str], status: RequestStatus) -> None:
        """Stop strings (decided by the output processor) and aborts. Unknown or already finished ids are
        ignored: an abort racing with a natural finish is normal. A parent takes its pending forks along."""
        if not status.finished:
            raise ValueError(f"finish_requests needs a FINISHED_* status, got {status.name}")
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            request = self.requests.get(rid)
            if request is None:
                continue
            parent = self._fork_parents.pop(rid, None)
            if parent is not None:
                parent.pending_forks.remove(request)
                self._mark_finished(request, status)
                continue
            if request in self.running:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.kv.free(request)
        for child in request.pending_forks:
            del self._fork_parents[child.request_id]
            self._mark_finished(child, RequestStatus.FINISHED_ABORTED)
        request.pending_forks = []
        self._mark_finished(request, status)

    def _mark_finished(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        request.metrics.finished_time = time.monotonic()
        del self.requests[request.request_id]

    # ---- one step ----------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.num_output_placeholders and request.reaches_length_limit(request.num_output_placeholders):
                index += 1  # finishes when its tokens in flight arrive, whatever they are
                continue
            num_new = min(request.num_tokens_with_placeholders - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new, preempted):
                break  # the request itself was preempted: everything after it already was
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            index += 1
        # After a preemption the head of the queue is a request that just failed to fit: wait for a finish.
        if not preempted:
            budget = self._admit(budget, scheduled)
        return SchedulerOutput(scheduled, self.kv.take_blocks_to_copy(),
                               self.config.max_num_batched_tokens - budget, preempted)

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[Request]) -> bool:
        """Preempts the most recently admitted running requests until `request` fits; False if it had to go."""
        while not self.kv.allocate_slots(request, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        """Recompute-style preemption: drop the KV, keep the tokens; the prefix cache may bring much back."""
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)

    def _admit(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        """FCFS admission; stops at the first request that does not fit, so later ones cannot overtake it.
        Pending fork children hold their sequence slots from admission on, so the fork never lacks room."""
        num_seqs = sum(1 + len(r.pending_forks) for r in self.running)
        while self.waiting and budget > 0:
            request = self.waiting[0]
            if num_seqs + 1 + len(request.pending_forks) > self.config.max_num_seqs:
                break
            computed, num_cached = self.kv.get_computed_blocks(request)
            num_new = request.num_tokens - num_cached
            if self.config.enable_chunked_prefill:
                num_new = min(num_new, budget)
            elif num_new > budget:
                break
            if not self.kv.allocate_slots(request, num_new, computed):
                break
            self.waiting.popleft()
            # Counted on admission only: a request stuck at the head of the queue is not a new query each step.
            self.kv.block_pool.record_query(request.num_tokens, num_cached)
            request.num_computed_tokens = num_cached
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new))
            num_seqs += 1 + len(request.pending_forks)
            budget -= num_new
        return budget

    @staticmethod
    def _scheduled(request: Request, num_new: int) -> ScheduledRequest:
        """The step's item for `request`; advances the request past it, with a placeholder for a sampled token."""
        start = request.num_computed_tokens
        sample = start + num_new == request.num_tokens_with_placeholders
        forks = list(request.pending_forks) if sample else []
        request.num_computed_tokens = start + num_new
        request.num_output_placeholders += sample
        return ScheduledRequest(request, num_new, start, sample, forks)

    # ---- results --------------------------------------------------------------------------------------------

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Replaces the step's placeholders with the sampled tokens, performs forks and finishes requests.
        Returns every request that got a token this step (finished ones included). A request may have been
        preempted since the step was scheduled (async scheduling): it gets its token in the waiting queue."""
        # Aborted (or finished by a stop string) since this output was made: skipped, like aborted children.
        live = [item for item in output.scheduled
                if item.request.status in (RequestStatus.RUNNING, RequestStatus.PREEMPTED)]
        missing = [seq.request_id for item in live if item.sample
                   for seq in (item.request, *self._pending(item.forks)) if seq.request_id not in sampled]
        if missing:
            raise ValueError(f"no sampled token for request(s) {missing}")
        now = time.monotonic()
        block_size = self.config.block_size
        new_tokens: list[Request] = []
        for item in live:
            request = item.request
            if not item.sample:
                continue
            request.num_output_placeholders -= 1
            children = self._pending(item.forks)
            if children:
                self._fork(request, item.num_computed_tokens + item.num_new_tokens, children)
            for seq in (request, *children):
                seq.append_output_token(sampled[seq.request_id])
                if len(seq.all_token_ids) % block_size == 0:  # the token completes a block
                    self.kv.cache_blocks(seq)
                if seq.metrics.first_token_time is None:
                    seq.metrics.first_token_time = now
                new_tokens.append(seq)
                stop = seq.check_token_stop()
                if stop is not None:
                    if seq.status is RequestStatus.PREEMPTED:
                        self.waiting.remove(seq)
                    self._finish(seq, stop)
        self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        return new_tokens

    def _pending(self, forks: list[Request]) -> list[Request]:
        return [child for child in forks if child.request_id in self._fork_parents] if forks else forks

    def _fork(self, parent: Request, num_computed: int, children: list[Request]) -> None:
        """The children take the parent's table (shared blocks) and run right after it in admission order, from
        `num_computed`, the end of the prompt the parent sampled them at."""
        position = self.running.index(parent) + 1
        for offset, child in enumerate(children):
            self.kv.fork(parent, child)
            child.num_computed_tokens = num_computed
            child.num_cached_tokens = parent.num_cached_tokens
            child.metrics.first_scheduled_time = parent.metrics.first_scheduled_time
            child.status = RequestStatus.RUNNING
            del self._fork_parents[child.request_id]
            parent.pending_forks.remove(child)
            self.running.insert(position + offset, child)

    # ---- stats ------------------------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.kv.block_pool.hit_rate

    @property
    def prefix_cache_query_tokens(self) -> int:
        return self.kv.block_pool.num_query_tokens

    @property
    def prefix_cache_hit_tokens(self) -> int:
        return self.kv.block_pool.num_hit_tokens
