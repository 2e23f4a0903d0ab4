"""The async front of the step-level LLMEngine, for the server.

One background thread owns the engine and runs the step loop; coroutines hand it requests and aborts through a
command queue and get each request's outputs on their own asyncio queue. A thread rather than an asyncio task:
a step is a blocking forward pass (hundreds of ms on CPU), and the event loop must stay free meanwhile to answer
/health, accept new requests and notice disconnects. Everything that touches the engine happens on that thread;
everything that touches the queues happens on the event loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from quantkit.engine.llm_engine import LLMEngine
from quantkit.outputs import RequestOutput
from quantkit.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step loop raised; the engine serves nothing more."""


class QueueFullError(RuntimeError):
    """More requests are in flight than the running batch plus the waiting queue may hold."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class RequestAbortedError(RuntimeError):
    """Raised to a consumer still waiting on a stream that was aborted (its client left)."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot taken by the engine thread after every step; read from any thread."""

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@dataclass(frozen=True)
class FinishedRequest:
    """What the metrics need about a request that ended (finished, stopped or aborted), timed on the event loop
    from the moment the server handed it over."""

    finish_reasons: list[str]
    num_prompt_tokens: int
    num_output_tokens: int
    e2e_s: float
    ttft_s: float | None
    tpot_s: float | None


@dataclass(eq=False)
class _Tracked:
    queue: asyncio.Queue | None  # None once the consumer left (disconnect): outputs are only counted
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None


class OutputStream:
    """The engine requests behind one API call (one per prompt). Iterating yields lists of the latest output of
    each request that changed; outputs are cumulative, so several pending ones collapse into the newest."""

    def __init__(self, engine: AsyncLLMEngine, request_ids: list[str], outputs: asyncio.Queue) -> None:
        self._engine = engine
        self.request_ids = request_ids
        self._queue = outputs
        self._unfinished = set(request_ids)
        self._aborted = False

    @property
    def finished(self) -> bool:
        return not self._unfinished

    async def __aiter__(self) -> AsyncIterator[list[RequestOutput]]:
        while self._unfinished:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            latest: dict[str, RequestOutput] = {}
            for item in items:
                if isinstance(item, BaseException):
                    raise item
                latest[item.request_id] = item
                if item.finished:
                    self._unfinished.discard(item.request_id)
            yield list(latest.values())

    def abort(self) -> None:
        """Aborts what is still running (a disconnect): the engine frees its KV blocks within one step, and a
        consumer still iterating gets RequestAbortedError."""
        if self._unfinished and not self._aborted:
            self._aborted = True
            self._engine.abort(sorted(self._unfinished))
            self._queue.put_nowait(RequestAbortedError("the request was aborted"))


class AsyncLLMEngine:
    """Runs `engine` on a background thread. `max_queue` bounds the requests waiting for a running slot:
    beyond `max_num_seqs + max_queue` in flight, `add` raises QueueFullError (the server's 503).
    `on_finished` is called on the event loop for every request that ends."""

    def __init__(self, engine: LLMEngine, max_queue: int | None = None,
                 on_finished: Callable[[FinishedRequest], None] | None = None) -> None:
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue must be >= 0 (or None for no bound), got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.on_finished = on_finished
        self.stats = EngineStats()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._accepting = True
        self.error: BaseException | None = None
        self._snapshot()

    # ---- life cycle (event loop) --------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the step thread; must be called from the event loop that will consume the outputs."""
        if self._thread is not None:
            raise ValueError("AsyncLLMEngine.start() was already called")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="quantkit-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_in_flight(self) -> int:
        return len(self._tracked)

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown: take no new requests, let the running ones finish for up to `timeout` seconds,
        then abort the rest so their clients get a final (finish_reason 'abort') output."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._tracked and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._tracked:
            logger.info("shutdown: aborting %d request(s) still running after %.1f s", len(self._tracked), timeout)
            self.abort(list(self._tracked), notify=True)
        while self._tracked and time.monotonic() < deadline + 5.0:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Stops the step thread (after the step in progress) and aborts whatever is left."""
        self._accepting = False
        if self._thread is None:
            return
        self._commands.put(("stop",))
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # ---- requests (event loop) ----------------------------------------------------------------------------

    async def add(self, prompts: list[str | list[int] | dict], params: SamplingParams,
                  request_id: str | None = None) -> OutputStream:
        """Queues one engine request per prompt (ids `request_id-i`), all or nothing: a ValueError from any of
        them (a prompt too long, n above max_num_seqs, ...) aborts the others and propagates."""
        self._check_accepting(len(prompts))
        base = request_id if request_id is not None else f"req-{next(self._ids)}"
        ids = [f"{base}-{i}" for i in range(len(prompts))]
        outputs: asyncio.Queue = asyncio.Queue()
        for rid in ids:
            if rid in self._tracked:
                raise ValueError(f"request id {rid!r} is already in use")
        for rid in ids:
            self._tracked[rid] = _Tracked(outputs)
        futures = []
        for rid, prompt in zip(ids, prompts):
            future: concurrent.futures.Future = concurrent.futures.Future()
            self._commands.put(("add", rid, prompt, params, future))
            futures.append(asyncio.wrap_future(future))
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        except asyncio.CancelledError:  # the caller went away while the adds were queued
            for rid in ids:
                self._tracked.pop(rid, None)
            self._commands.put(("abort", ids))
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for rid in ids:
                self._tracked.pop(rid, None)
            self._commands.put(("abort", ids))
            raise errors[0]
        return OutputStream(self, ids, outputs)

    def abort(self, request_ids: list[str], notify: bool = False) -> None:
        """Aborts requests. notify=False (a client left): nothing more is delivered. notify=True (shutdown):
        the final aborted outputs still reach the consumers."""
        for rid in request_ids:
            tracked = self._tracked.get(rid)
            if tracked is not None and not notify:
                tracked.queue = None
        self._commands.put(("abort", list(request_ids)))

    def _check_accepting(self, num_requests: int) -> None:
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.error!r}")
        if not self._accepting or self._thread is None:
            raise EngineClosedError("the server is shutting down")
        if self.max_queue is not None:
            limit = self.engine.config.max_num_seqs + self.max_queue
            if len(self._tracked) + num_requests > limit:
                raise QueueFullError(f"{len(self._tracked)} requests are in flight and the limit is {limit} "
                                     f"(max_num_seqs={self.engine.config.max_num_seqs} + "
                                     f"max_queue={self.max_queue})")

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Event loop side of a step: route outputs to their queues and time the requests."""
        now = time.monotonic()
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            if tracked.first_token is None and any(c.token_ids for c in out.outputs):
                tracked.first_token = now
            if tracked.queue is not None:
                tracked.queue.put_nowait(out)
            if out.finished:
                del self._tracked[out.request_id]
                self._record(out, tracked, now)

    def _record(self, out: RequestOutput, tracked: _Tracked, now: float) -> None:
        if self.on_finished is None:
            return
        num_out = sum(len(c.token_ids) for c in out.outputs)
        longest = max((len(c.token_ids) for c in out.outputs), default=0)
        ttft = None if tracked.first_token is None else tracked.first_token - tracked.arrival
        tpot = (now - tracked.first_token) / (longest - 1) if tracked.first_token is not None and longest > 1 \
            else None
        self.on_finished(FinishedRequest([c.finish_reason or "abort" for c in out.outputs],
                                         len(out.prompt_token_ids), num_out, now - tracked.arrival, ttft, tpot))

    def _fail_all(self, error: BaseException) -> None:
        for tracked in self._tracked.values():
            if tracked.queue is not None:
                tracked.queue.put_nowait(EngineDeadError(f"the engine stopped after an error: {error!r}"))
        self._tracked.clear()

    # ---- the step thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._process_commands(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    self._publish(self.engine.step())
                self._snapshot()
        except Exception as e:  # a bug in a step: fail every request loudly rather than hang them
            logger.exception("the engine step loop failed")
            self.error = e
            self._call_soon(self._fail_all, e)

    def _process_commands(self, block: bool) -> bool:
        """Runs the queued adds and aborts (waiting for one when idle); False once asked to stop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            kind = command[0]
            if kind == "stop":
                self._abort_all_in_engine()
                return False
            if kind == "add":
                self._add(*command[1:])
            elif kind == "abort":
                self._publish(self.engine.abort_request(command[1]))

    def _add(self, request_id: str, prompt: Any, params: SamplingParams,
             future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            self.engine.add_request(prompt, params, request_id)
        except ValueError as e:
            future.set_exception(e)
        else:
            future.set_result(None)

    def _abort_all_in_engine(self) -> None:
        ids = list(self.engine.output_processor.states)
        if ids:
            self._publish(self.engine.abort_request(ids))
        self._snapshot()

    def _publish(self, outputs: list[RequestOutput]) -> None:
        if outputs:
            self._call_soon(self._dispatch, outputs)

    def _call_soon(self, fn: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is already closed (process exit): nobody is listening
            pass

    def _snapshot(self) -> None:
        sched = self.engine.scheduler
        pool = sched.kv.block_pool
        self.stats = EngineStats(sched.num_running, sched.num_waiting, sched.kv.num_free_blocks,
                                 sched.kv.num_blocks, pool.num_query_tokens, pool.num_hit_tokens,
                                 sched.num_preemptions_total)
