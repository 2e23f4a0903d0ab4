"""Executes one scheduled step: stage the mixed prefill/decode batch's inputs (one copy, step_buffers.py), run the
model over the paged KV cache, or replay a decode CUDA graph (cuda_graphs.py), and sample the rows whose chunk
reached the end of their sequence.

`launch` only queues the work and the copy of the sampled ids to the host; `wait` waits for that copy. In between
the engine may launch the next step (async scheduling), whose inputs include placeholders (request.py): their
token ids are taken on the device from the sampled ids of the step launched just before."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from quantkit.engine.block_table import BlockTables
from quantkit.engine.cuda_graphs import DecodeGraphs, capture_sizes
from quantkit.engine.kv_cache import attention_layers, copy_blocks
from quantkit.engine.kv_cache_manager import cdiv
from quantkit.engine.request import Request
from quantkit.engine.scheduler import ScheduledRequest, SchedulerConfig, SchedulerOutput
from quantkit.engine.step_buffers import StepBuffers, StepViews
from quantkit.layers.attention import AttentionMetadata
from quantkit.layers.sampler import LogprobTensors, Sampler, SamplingBatch, compute_prompt_logprobs
from quantkit.layers.transfer import to_device, to_host

_PLACEHOLDER = -1  # staged for an input token that is still on the device


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, object] = field(default_factory=dict)          # request id -> sampler's logprob entry
    prompt_logprobs: dict[str, tuple[int, list]] = field(default_factory=dict)  # id -> (first position, entries)


@dataclass
class LaunchedStep:
    """A step queued on the device, its results on their way to the host."""
    request_ids: list[str]                 # row i of the sampled ids belongs to request_ids[i]
    token_ids: torch.Tensor                # [rows] on the host (pinned on CUDA), valid once `copied` has passed
    logprobs: LogprobTensors | None        # likewise
    prompt_logprobs: dict[str, tuple[int, list]]  # computed on the host already (they wait for the device)
    copied: torch.cuda.Event | None        # None on CPU, where everything has run already


class ModelRunner:
    """Sized by the scheduler's limits: a step never exceeds max_num_batched_tokens tokens, max_num_seqs sequences
    or max_model_len tokens per sequence, so every buffer is allocated once, here."""

    def __init__(self, model: nn.Module, config: SchedulerConfig, device: torch.device, seed: int) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(seed))
        self._generators: dict[str, torch.Generator] = {}
        max_blocks = cdiv(config.max_model_len, config.block_size)
        self.tables = BlockTables(config.max_num_seqs, max_blocks, config.block_size)
        self.buffers = StepBuffers(config.max_num_batched_tokens, config.max_num_seqs, max_blocks, device)
        self.graphs: DecodeGraphs | None = None
        # The last launch's sampled ids, on the device, and whose they are: the next launch's placeholders.
        self._last_sampled: tuple[torch.Tensor, list[str]] | None = None

    @torch.inference_mode()
    def init_decode_graphs(self, capture: bool) -> None:
        """Pads every decode-only step to a batch size of `capture_sizes` and, with `capture`, replays the CUDA graph
        captured for it. Call once the KV cache is allocated: the graphs hold its addresses. Without `capture` the
        padded batch runs eagerly (any device): the computation a replay performs, for tests."""
        graphs = DecodeGraphs(capture_sizes(self.config.max_num_seqs), self._forward_bucket)
        if capture:
            backend = attention_layers(self.model)[0].backend
            if self.device.type != "cuda" or not backend.cuda_graphs:
                raise ValueError(f"CUDA graphs need a CUDA device and a graph-safe attention backend, got "
                                 f"{self.device} and {backend.name!r}")
            graphs.capture(self.device, lambda n: self._stage([], pad_to=n))
        self.graphs = graphs

    def forget(self, request_id: str) -> None:
        """Drop per-request state (its seeded generator, its block-table row) once the request is finished."""
        self._generators.pop(request_id, None)
        self.tables.release(request_id)

    def _generator(self, request: Request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        if request.request_id not in self._generators:
            # Completions of one request get distinct but reproducible streams.
            self._generators[request.request_id] = torch.Generator(device=self.device).manual_seed(
                seed + request.index)
        return self._generators[request.request_id]

    def _stage(self, scheduled: list[ScheduledRequest], pad_to: int | None = None) -> StepViews:
        """Fills the staging buffer with the step's inputs and starts their one copy to the device. `pad_to` (a
        bucket, for a decode-only step) appends padding sequences up to it and uses the full block-table width,
        the layout its CUDA graph was captured on; see cuda_graphs.py for why padding rows are harmless."""
        self.buffers.wait_for_copy()
        num_seqs, bs = len(scheduled), self.config.block_size
        counts = np.fromiter((s.num_new_tokens for s in scheduled), np.int64, num_seqs)
        starts = np.fromiter((s.num_computed_tokens for s in scheduled), np.int64, num_seqs)
        rows = np.fromiter((self.tables.sync(s.request, s.num_computed_tokens) for s in scheduled), np.int64,
                           num_seqs)
        ends = np.cumsum(counts)  # each sequence's end in the step's token list
        num_tokens = int(ends[-1]) if num_seqs else 0
        if num_tokens == num_seqs:  # one token each (decodes): no list slice per sequence, no per-token expansion
            token_ids = [s.request.all_token_ids[s.num_computed_tokens] if s.num_computed_tokens < len(
                s.request.all_token_ids) else _PLACEHOLDER for s in scheduled]
            pos, token_rows = starts, rows
        else:
            token_ids = []
            for s in scheduled:
                chunk = s.request.all_token_ids[s.num_computed_tokens:s.num_computed_tokens + s.num_new_tokens]
                token_ids += chunk if len(chunk) == s.num_new_tokens else chunk + [_PLACEHOLDER]
            pos = np.arange(num_tokens) + np.repeat(starts - (ends - counts), counts)
            token_rows = np.repeat(rows, counts)
        seq_lens = starts + counts
        if pad_to is None:
            views = self.buffers.views(num_tokens, num_seqs, cdiv(int(seq_lens.max()), bs))
        else:
            views = self.buffers.views(pad_to, pad_to, self.tables.max_blocks)
        ids, positions, slots = views.input_ids[0], views.positions[0], views.slot_mapping[0]
        qsl, lens, table = views.query_start_loc[0], views.seq_lens[0], views.block_tables[0]
        qsl[0] = 0
        qsl[1:num_seqs + 1] = ends
        ids[:num_tokens] = token_ids
        placeholders = np.flatnonzero(ids[:num_tokens] == _PLACEHOLDER)
        if placeholders.size:
            seqs = placeholders if num_tokens == num_seqs else np.searchsorted(ends, placeholders, side="right")
            self._stage_placeholders(views, placeholders, [scheduled[i] for i in seqs.tolist()])
        positions[:num_tokens] = pos
        slots[:num_tokens] = self.tables.table[token_rows, pos // bs].astype(np.int64) * bs + pos % bs
        lens[:num_seqs] = seq_lens
        table[:num_seqs] = self.tables.table[rows, :table.shape[1]]
        if pad_to is not None:  # one token per padding sequence
            ids[num_tokens:], positions[num_tokens:], slots[num_tokens:] = 0, 0, -1
            qsl[num_seqs + 1:] = np.arange(num_tokens + 1, pad_to + 1)
            lens[num_seqs:], table[num_seqs:] = 1, 0
        self.buffers.copy_to_device(views)
        if placeholders.size:  # after the copy that brings the other ids, before the forward (or replay) reads them
            n = placeholders.size
            views.input_ids[1].index_copy_(0, views.placeholder_tokens[1][:n],
                                           self._last_sampled[0].index_select(0, views.placeholder_sources[1][:n]))
        return views

    def _stage_placeholders(self, views: StepViews, placeholders: np.ndarray,
                            scheduled: list[ScheduledRequest]) -> None:
        """Stages where each placeholder input token sits and its row in the last launch's sampled ids."""
        last_ids = [] if self._last_sampled is None else self._last_sampled[1]
        rows = dict(zip(last_ids, range(len(last_ids))))
        try:
            sources = [rows[s.request.request_id] for s in scheduled]
        except KeyError as e:
            raise RuntimeError(f"request {e.args[0]!r} decodes a placeholder that the previous step did not "
                               "sample") from None
        views.placeholder_tokens[0][:placeholders.size] = placeholders
        views.placeholder_sources[0][:placeholders.size] = sources

    def _metadata(self, views: StepViews, max_seq_len: int | None = None) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=views.query_start_loc[1], seq_lens=views.seq_lens[1],
            query_start_loc_cpu=views.query_start_loc[0].tolist(), seq_lens_cpu=views.seq_lens[0].tolist(),
            slot_mapping=views.slot_mapping[1], block_tables=views.block_tables[1], max_seq_len=max_seq_len)

    def _forward_bucket(self, n: int) -> torch.Tensor:
        """Logits [n, V] of the staged inputs of bucket n, launches sized by n and max_model_len alone (graph-safe).
        The LM head is part of the graph: a decode step's eager work is only the sampler's."""
        views = self.buffers.views(n, n, self.tables.max_blocks)
        hidden = self.model(views.input_ids[1], views.positions[1], self._metadata(views, self.config.max_model_len))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> LaunchedStep:
        """Queues the step; on CUDA the host does not wait for the device (prompt logprobs excepted)."""
        copy_blocks(self.model, out.blocks_to_copy, self.device)
        scheduled = out.scheduled
        bucket = None
        if self.graphs is not None and all(s.num_new_tokens == 1 for s in scheduled):
            bucket = self.graphs.bucket(len(scheduled))
        if bucket is None:
            views = self._stage(scheduled)
            meta = self._metadata(views)
            hidden = self.model(views.input_ids[1], views.positions[1], meta)
            starts = meta.query_start_loc_cpu

            def logits_of(rows: slice | list[int]) -> torch.Tensor:
                return self.model.compute_logits(self._pick(hidden, rows))
        else:
            # Rows [:B] of the padded batch are exactly the eager step's rows: sampling and prompt logprobs
            # read them alike.
            self._stage(scheduled, pad_to=bucket)
            logits = self.graphs.run(bucket)
            starts = list(range(len(scheduled) + 1))

            def logits_of(rows: slice | list[int]) -> torch.Tensor:
                return self._pick(logits, rows)
        prompt_logprobs = self._prompt_logprobs(scheduled, logits_of, starts)
        return self._sample(scheduled, logits_of, starts, prompt_logprobs)

    @staticmethod
    def wait(step: LaunchedStep) -> RunnerOutput:
        """The step's results, once their copy to the host is done (steps launched after it may still run)."""
        if step.copied is not None:
            step.copied.synchronize()
        result = RunnerOutput(dict(zip(step.request_ids, step.token_ids.tolist())),
                              prompt_logprobs=step.prompt_logprobs)
        if step.logprobs is not None:
            for rid, entry in zip(step.request_ids, step.logprobs.entries(len(step.request_ids))):
                if entry is not None:
                    result.logprobs[rid] = entry
        return result

    def _pick(self, rows_of: torch.Tensor, rows: slice | list[int]) -> torch.Tensor:
        """Rows of a step's hidden states or logits: a view when they are consecutive."""
        if isinstance(rows, list):
            if rows != list(range(rows[0], rows[0] + len(rows))):
                return rows_of[to_device(rows, self.device)]
            rows = slice(rows[0], rows[0] + len(rows))
        return rows_of[rows]

    def _sample(self, scheduled: list[ScheduledRequest], logits_of: Callable[[slice | list[int]], torch.Tensor],
                starts: list[int], prompt_logprobs: dict[str, tuple[int, list]]) -> LaunchedStep:
        rows, requests = [], []
        for i, s in enumerate(scheduled):
            if s.sample:
                for req in [s.request, *s.forks]:
                    rows.append(starts[i + 1] - 1)
                    requests.append(req)
        if not rows:
            self._last_sampled = None
            return LaunchedStep([], torch.empty(0, dtype=torch.int64), None, prompt_logprobs, None)
        logits = logits_of(rows)
        batch = SamplingBatch(params=[r.sampling_params for r in requests],
                              generators=[self._generator(r) for r in requests],
                              prompt_token_ids=[r.prompt_token_ids for r in requests],
                              output_token_ids=[r.output_token_ids for r in requests],
                              eos_token_ids=[r.eos_token_ids for r in requests])
        sampled = self.sampler(logits, batch)
        request_ids = [r.request_id for r in requests]
        self._last_sampled = (sampled.token_ids, request_ids)
        logprobs = sampled.logprob_tensors
        step = LaunchedStep(request_ids, to_host(sampled.token_ids), None if logprobs is None else
                            logprobs.map(to_host), prompt_logprobs, None)
        if self.device.type == "cuda":
            step.copied = torch.cuda.Event()
            step.copied.record()
        return step

    def _prompt_logprobs(self, scheduled: list[ScheduledRequest],
                         logits_of: Callable[[slice | list[int]], torch.Tensor],
                         starts: list[int]) -> dict[str, tuple[int, list]]:
        """Logprob of each next prompt token, for requests that asked, over the part of the prompt in this chunk.
        Keyed by request id: (first position, entries)."""
        result = {}
        for i, s in enumerate(scheduled):
            req, num = s.request, s.request.sampling_params.prompt_logprobs
            if num is None or s.num_computed_tokens >= req.num_prompt_tokens - 1 or req.num_output_tokens:
                continue
            first = s.num_computed_tokens
            last = min(first + s.num_new_tokens, req.num_prompt_tokens - 1)
            logits = logits_of(slice(starts[i], starts[i] + last - first))
            targets = req.prompt_token_ids[first + 1:last + 1]
            result[req.request_id] = (first + 1, compute_prompt_logprobs(logits, targets, num))
        return result
