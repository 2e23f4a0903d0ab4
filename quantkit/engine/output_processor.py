"""Turns sampled tokens into user-facing RequestOutputs: incremental text, stop strings, logprobs, n > 1
completions gathered under their parent request."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quantkit.engine.detokenizer import IncrementalDetokenizer, StopChecker, backend_tokenizer
from quantkit.engine.model_runner import RunnerOutput
from quantkit.engine.request import FINISH_REASONS, Request
from quantkit.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from quantkit.sampling_params import RequestOutputKind


@dataclass
class CompletionState:
    request: Request
    detokenizer: IncrementalDetokenizer | None
    stop_checker: StopChecker
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer else ""


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    final_only: bool  # SamplingParams.output_kind: no output before the request finishes
    completions: list[CompletionState] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        # A loop, not all(<generator>): asked for every request every step, and the generator objects fed the GC.
        for c in self.completions:
            if c.finish_reason is None:
                return False
        return True


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._backend = backend_tokenizer(tokenizer) if tokenizer is not None else None
        self.states: dict[str, RequestState] = {}
        self._completion_of: dict[str, tuple[RequestState, CompletionState]] = {}

    def add(self, request_id: str, prompt: str | None, sequences: list[Request]) -> None:
        first = sequences[0]
        params = first.sampling_params
        prompt_logprobs = None if params.prompt_logprobs is None else [None] * first.num_prompt_tokens
        state = RequestState(request_id, prompt, first.prompt_token_ids, prompt_logprobs,
                             params.output_kind == RequestOutputKind.FINAL_ONLY)
        for seq in sequences:
            detok = None if self.tokenizer is None else IncrementalDetokenizer(
                self.tokenizer, seq.prompt_token_ids, seq.sampling_params.skip_special_tokens)
            completion = CompletionState(seq, detok, StopChecker(params.stop, params.include_stop_str_in_output),
                                         logprobs=None if params.logprobs is None else [])
            state.completions.append(completion)
            self._completion_of[seq.request_id] = (state, completion)
        self.states[request_id] = state

    def sequence_ids(self, request_id: str) -> list[str]:
        state = self.states.get(request_id)
        return [] if state is None else [c.request.request_id for c in state.completions]

    def _decode_token(self, token_id: int) -> str | None:
        return None if self._backend is None else self._backend.decode([token_id], skip_special_tokens=False)

    def process(self, updated: list[Request], runner_out: RunnerOutput) -> tuple[list[RequestOutput], list[str]]:
        """Returns the outputs of requests that changed (of FINAL_ONLY ones: that finished) and the sequence ids
        that a stop string finished."""
        touched: dict[str, RequestState] = {}
        for seq_id, (first, entries) in runner_out.prompt_logprobs.items():
            state, _ = self._completion_of[seq_id]
            for offset, entry in enumerate(entries):
                state.prompt_logprobs[first + offset] = entry.to_dict(self._decode_token)
        stopped: list[str] = []
        for seq in updated:
            state, completion = self._completion_of[seq.request_id]
            token = seq.output_token_ids[-1]
            entry = runner_out.logprobs.get(seq.request_id)
            if entry is not None:
                completion.cumulative_logprob += entry.logprob
                completion.logprobs.append(entry.to_dict(self._decode_token))
            if self._add_token(completion, token, seq):
                stopped.append(seq.request_id)
            touched[state.request_id] = state
        return [self.make_output(s) for s in touched.values() if not s.final_only or s.finished], stopped

    def _add_token(self, completion: CompletionState, token: int, seq: Request) -> bool:
        """Detokenizes; True when a stop string ended a still-running sequence (the scheduler must finish it)."""
        finished = seq.is_finished
        if finished:
            completion.finish_reason = FINISH_REASONS[seq.status]
            completion.stop_reason = seq.stop_reason
        if completion.detokenizer is None:
            return False
        delta = completion.detokenizer.step([token], finished=finished)
        hit = completion.stop_checker.check(completion.text, len(delta))
        if hit is None or seq.num_output_tokens < seq.sampling_params.min_tokens:
            return False
        if not finished:
            completion.detokenizer.step([], finished=True)
        stop_str, cut = hit
        completion.detokenizer.truncate(cut)
        completion.finish_reason, completion.stop_reason = "stop", stop_str
        return not finished

    def finish_aborted(self, request_id: str) -> RequestOutput | None:
        state = self.states.get(request_id)
        if state is None:
            return None
        for c in state.completions:
            if c.finish_reason is None:
                c.finish_reason = "abort"
        return self.make_output(state)

    def make_output(self, state: RequestState) -> RequestOutput:
        outputs = []
        for i, c in enumerate(state.completions):
            shown = len(c.text) if c.finish_reason else c.stop_checker.emittable_length(c.text, False)
            outputs.append(CompletionOutput(
                index=i, text=c.text[:shown], token_ids=list(c.request.output_token_ids),
                cumulative_logprob=c.cumulative_logprob if c.logprobs is not None else None,
                logprobs=c.logprobs, finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        first = state.completions[0].request
        finished = state.finished
        if finished:
            self.states.pop(state.request_id, None)
            for c in state.completions:
                self._completion_of.pop(c.request.request_id, None)
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, state.prompt_logprobs,
                             outputs, finished, first.metrics, first.num_cached_tokens)
