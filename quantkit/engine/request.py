"""One request's state. Prefill, chunked prefill, recompute after preemption and decode share one arithmetic:
the tokens still to compute are `all_token_ids[num_computed_tokens:]`, and the step that computes the last
of them samples the next token.

A step that samples leaves a placeholder (`num_output_placeholders`) until its token reaches the host: with async
scheduling the next step is scheduled before that, and computes the placeholder's position, its token read on the
device from the step before."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from quantkit.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def finished(self) -> bool:
        return self in FINISH_REASONS  # a dict lookup: asked for every sequence every step


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # Tokens that stop generation beyond sampling_params.stop_token_ids (EOS, unless ignore_eos).
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int | None = None
    # Position of this sequence among the n completions of its parent request (n > 1 forks share blocks).
    index: int = 0
    parent_id: str | None = None
    # Children that take a copy of this request's block table when its prompt is done (n > 1).
    pending_forks: list["Request"] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # advanced when a step is scheduled
    num_output_placeholders: int = 0  # tokens sampled by scheduled steps that have not reached the host yet
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at admission
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))

    def __post_init__(self) -> None:
        self.all_token_ids: list[int] = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        """What the scheduler computes up to: the known tokens and the ones still on their way."""
        return len(self.all_token_ids) + self.num_output_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_token_stop(self) -> RequestStatus | None:
        """Stop conditions decided by token ids alone (stop strings are the output processor's job)."""
        params = self.sampling_params
        if self.num_output_tokens >= params.min_tokens:
            last = self.output_token_ids[-1]
            if last in self.eos_token_ids and not params.ignore_eos:
                self.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if last in params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        # Not held back by min_tokens: max_tokens >= min_tokens anyway, and nothing may grow past max_model_len.
        return RequestStatus.FINISHED_LENGTH if self.reaches_length_limit(0) else None

    def reaches_length_limit(self, num_ahead: int) -> bool:
        """Whether max_tokens or max_model_len is reached once `num_ahead` more tokens have arrived: the scheduler
        does not schedule a request its placeholders already finish, whatever their tokens turn out to be."""
        max_tokens = self.sampling_params.max_tokens
        return ((max_tokens is not None and self.num_output_tokens + num_ahead >= max_tokens)
                or (self.max_model_len is not None and self.num_tokens + num_ahead >= self.max_model_len))

    def sampling_reads_outputs(self) -> bool:
        """Whether sampling this request's next token reads its output tokens, so they must be on the host first:
        penalties read all of them; min_tokens masking reads their number until it is past min_tokens (a
        placeholder would be counted one short)."""
        num_outputs = self.num_output_tokens + self.num_output_placeholders
        return self.sampling_params.has_penalties or num_outputs <= self.sampling_params.min_tokens
