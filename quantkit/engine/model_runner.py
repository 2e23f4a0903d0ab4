"""Executes one scheduled step: flatten the mixed prefill/decode batch, run the model over the paged KV cache,
and sample the rows whose chunk reached the end of their sequence."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from quantkit.engine.kv_cache import copy_blocks
from quantkit.engine.request import Request
from quantkit.engine.scheduler import ScheduledRequest, SchedulerOutput
from quantkit.layers.attention import AttentionMetadata
from quantkit.layers.sampler import Sampler, SamplingBatch, compute_prompt_logprobs


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, object] = field(default_factory=dict)          # request id -> sampler's logprob entry
    prompt_logprobs: dict[str, tuple[int, list]] = field(default_factory=dict)  # id -> (first position, entries)


@dataclass
class StepInputs:
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    query_start_loc: list[int] = field(default_factory=lambda: [0])
    seq_lens: list[int] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: nn.Module, block_size: int, device: torch.device, seed: int) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(seed))
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        """Drop per-request state (its seeded generator) once the request is finished."""
        self._generators.pop(request_id, None)

    def _generator(self, request: Request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        if request.request_id not in self._generators:
            # Completions of one request get distinct but reproducible streams.
            self._generators[request.request_id] = torch.Generator(device=self.device).manual_seed(
                seed + request.index)
        return self._generators[request.request_id]

    def _prepare(self, scheduled: list[ScheduledRequest]) -> tuple[StepInputs, list[list[int]]]:
        inputs, block_tables = StepInputs(), []
        for s in scheduled:
            req, start, end = s.request, s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens
            blocks = req.block_ids
            inputs.input_ids += req.all_token_ids[start:end]
            inputs.positions += range(start, end)
            inputs.slots += [blocks[p // self.block_size] * self.block_size + p % self.block_size
                             for p in range(start, end)]
            inputs.query_start_loc.append(inputs.query_start_loc[-1] + s.num_new_tokens)
            inputs.seq_lens.append(end)
            block_tables.append(blocks)
        return inputs, block_tables

    def _metadata(self, inputs: StepInputs, block_tables: list[list[int]]) -> AttentionMetadata:
        width = max(len(b) for b in block_tables)
        table = torch.tensor([b + [0] * (width - len(b)) for b in block_tables], dtype=torch.int32)
        to_dev = lambda values, dtype: torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)  # noqa: E731
        return AttentionMetadata(
            query_start_loc=to_dev(inputs.query_start_loc, torch.int32), seq_lens=to_dev(inputs.seq_lens, torch.int32),
            query_start_loc_cpu=inputs.query_start_loc, seq_lens_cpu=inputs.seq_lens,
            slot_mapping=to_dev(inputs.slots, torch.int64), block_tables=table.to(self.device, non_blocking=True))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        copy_blocks(self.model, out.blocks_to_copy, self.device)
        inputs, block_tables = self._prepare(out.scheduled)
        meta = self._metadata(inputs, block_tables)
        input_ids = torch.tensor(inputs.input_ids, dtype=torch.int64).to(self.device, non_blocking=True)
        positions = torch.tensor(inputs.positions, dtype=torch.int64).to(self.device, non_blocking=True)
        hidden = self.model(input_ids, positions, meta)
        result = RunnerOutput()
        self._prompt_logprobs(out.scheduled, hidden, inputs.query_start_loc, result)
        self._sample(out.scheduled, hidden, inputs.query_start_loc, result)
        return result

    def _sample(self, scheduled: list[ScheduledRequest], hidden: torch.Tensor, starts: list[int],
                result: RunnerOutput) -> None:
        rows, requests = [], []
        for i, s in enumerate(scheduled):
            if s.sample:
                for req in [s.request, *s.forks]:
                    rows.append(starts[i + 1] - 1)
                    requests.append(req)
        if not rows:
            return
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        batch = SamplingBatch(params=[r.sampling_params for r in requests],
                              generators=[self._generator(r) for r in requests],
                              prompt_token_ids=[r.prompt_token_ids for r in requests],
                              output_token_ids=[r.output_token_ids for r in requests],
                              eos_token_ids=[r.eos_token_ids for r in requests])
        sampled = self.sampler(logits, batch)
        for req, token, logprob in zip(requests, sampled.token_ids.tolist(), sampled.logprobs):
            result.sampled[req.request_id] = token
            if logprob is not None:
                result.logprobs[req.request_id] = logprob

    def _prompt_logprobs(self, scheduled: list[ScheduledRequest], hidden: torch.Tensor, starts: list[int],
                         result: RunnerOutput) -> None:
        """Logprob of each next prompt token, for requests that asked, over the part of the prompt in this chunk."""
        for i, s in enumerate(scheduled):
            req, num = s.request, s.request.sampling_params.prompt_logprobs
            if num is None or s.num_computed_tokens >= req.num_prompt_tokens - 1 or req.num_output_tokens:
                continue
            first = s.num_computed_tokens
            last = min(first + s.num_new_tokens, req.num_prompt_tokens - 1)
            logits = self.model.compute_logits(hidden[starts[i]:starts[i] + last - first])
            targets = torch.tensor(req.prompt_token_ids[first + 1:last + 1], device=self.device)
            result.prompt_logprobs[req.request_id] = (first + 1, compute_prompt_logprobs(logits, targets, num))
