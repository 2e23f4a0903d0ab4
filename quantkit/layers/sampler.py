"""Turns last-position logits into next tokens, with one SamplingParams per row.

Order, as in vLLM: logprobs from the raw logits; then penalties and min_tokens masking; then greedy rows take
the argmax and the others go through temperature -> top-k -> top-p -> min-p and an Exp(1)-noise draw
(argmax of probs / noise, the Gumbel-max trick). Every step is batched over rows; the only per-row Python
loop draws noise from a row's own generator, so a seeded row gets the same tokens whatever else is in the
batch and whatever its row index.

Nothing here reads a device tensor on the host or copies a list to the device synchronously (transfer.py): the
engine may queue the next step before this one's tokens are known, and the host must not wait here.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.layers.transfer import to_device
from quantkit.outputs import Logprob
from quantkit.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    """One step's per-row sampling state, built by the model runner; row i describes logits[i]."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]  # None: the sampler's shared generator
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]  # generated so far: penalties and min_tokens read them
    eos_token_ids: list[frozenset[int]]  # blocked with stop_token_ids until min_tokens (unless ignore_eos)

    def __post_init__(self) -> None:
        n = len(self.params)
        for name in ("generators", "prompt_token_ids", "output_token_ids", "eos_token_ids"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"SamplingBatch.{name} has {len(getattr(self, name))} rows, params has {n}")

    def __len__(self) -> int:
        return len(self.params)


@dataclass
class LogprobsEntry:
    """Logprobs at one position: the chosen token with its rank (1 = most likely) and the top tokens."""

    token_id: int
    logprob: float
    rank: int
    top_token_ids: list[int]
    top_logprobs: list[float]

    def to_dict(self, decode: Callable[[int], str] | None = None) -> dict[int, Logprob]:
        """vLLM's per-position dict: the chosen token first, then the top tokens by rank."""

        def entry(token_id: int, logprob: float, rank: int) -> Logprob:
            return Logprob(logprob, rank, decode(token_id) if decode else None)

        out = {self.token_id: entry(self.token_id, self.logprob, self.rank)}
        for rank, (token_id, logprob) in enumerate(zip(self.top_token_ids, self.top_logprobs), start=1):
            out.setdefault(token_id, entry(token_id, logprob, rank))
        return out


@dataclass
class LogprobTensors:
    """The logprob entries of some rows of a batch, still as tensors, so a step's results can travel to the host
    in non-blocking copies (`map`) and become entries only there."""

    rows: list[int]              # the batch rows these belong to
    nums: list[int]              # top tokens wanted per row
    token_ids: torch.Tensor      # [len(rows)] the chosen tokens
    logprobs: torch.Tensor       # [len(rows)] their logprobs
    ranks: torch.Tensor          # [len(rows)] their ranks (1 = most likely)
    top_token_ids: torch.Tensor  # [len(rows), max(nums)]
    top_logprobs: torch.Tensor   # [len(rows), max(nums)]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LogprobTensors:
        return LogprobTensors(self.rows, self.nums, fn(self.token_ids), fn(self.logprobs), fn(self.ranks),
                              fn(self.top_token_ids), fn(self.top_logprobs))

    def entries(self, num_rows: int) -> list[LogprobsEntry | None]:
        """One entry per batch row, None for rows that did not ask. Reads the tensors: on a device, it waits."""
        out: list[LogprobsEntry | None] = [None] * num_rows
        values = zip(self.token_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist(),
                     self.top_token_ids.tolist(), self.top_logprobs.tolist())
        for row, n, (t, lp, r, ids, lps) in zip(self.rows, self.nums, values):
            out[row] = LogprobsEntry(t, lp, r, ids[:n], lps[:n])
        return out


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [R] int64, on the logits' device
    logprob_tensors: LogprobTensors | None = None  # rows whose params.logprobs is set

    @property
    def logprobs(self) -> list[LogprobsEntry | None]:
        """Per row, None where not asked for."""
        if self.logprob_tensors is None:
            return [None] * self.token_ids.shape[0]
        return self.logprob_tensors.entries(self.token_ids.shape[0])


class Sampler(nn.Module):
    """Samples one token per row. `generator` serves every row that brings no generator of its own."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [R, V], any float dtype (processed in fp32; the input tensor is not modified)."""
        if logits.dim() != 2 or logits.shape[0] != len(batch):
            raise ValueError(f"logits must be [{len(batch)}, V], got {tuple(logits.shape)}")
        if all(map(_plain_argmax, batch.params, batch.output_token_ids)):
            # The common decode batch: one pass over the rows instead of one per stage below, and one op.
            return SamplerOutput(logits.argmax(-1))
        logits = logits.float()
        nums = [p.logprobs for p in batch.params]
        raw_logprobs = logits.log_softmax(-1) if any(n is not None for n in nums) else None
        logits = apply_min_tokens(apply_penalties(logits, batch), batch)
        token_ids = logits.argmax(-1)
        drawn = [i for i, p in enumerate(batch.params) if not p.greedy]
        if len(drawn) == len(batch):
            token_ids = self._sample_random(logits, batch.params, batch.generators)
        elif drawn:  # only the drawn rows pay for top-k/top-p/min-p and noise
            index = to_device(drawn, logits.device)
            sampled = self._sample_random(logits[index], [batch.params[i] for i in drawn],
                                          [batch.generators[i] for i in drawn])
            token_ids = token_ids.index_copy(0, index, sampled)
        if raw_logprobs is None:
            return SamplerOutput(token_ids)
        return SamplerOutput(token_ids, gather_logprobs(raw_logprobs, token_ids, nums))

    def _sample_random(self, logits: torch.Tensor, params: list[SamplingParams],
                       generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        logits = logits / to_device([p.temperature for p in params], logits.device).unsqueeze(1)
        logits = apply_top_k_top_p(logits, [p.top_k for p in params], [p.top_p for p in params])
        logits = apply_min_p(logits, [p.min_p for p in params])
        probs = logits.softmax(-1)
        return probs.div_(self._exponential_noise(probs, generators)).argmax(-1)

    def _exponential_noise(self, probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """Exp(1) noise [R, V]. A row with its own generator draws from it alone; the other rows share one draw
        from the shared generator."""
        noise = torch.empty_like(probs)
        shared = [i for i, g in enumerate(generators) if g is None]
        if len(shared) == len(generators):
            noise.exponential_(generator=self.generator)
        elif shared:
            noise.index_copy_(0, to_device(shared, probs.device), torch.empty(
                len(shared), probs.shape[1], device=probs.device).exponential_(generator=self.generator))
        for i, g in enumerate(generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        # exponential_ may return 0 and 0/0 is NaN, which argmax would pick.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _plain_argmax(params: SamplingParams, output_token_ids: list[int]) -> bool:
    """Greedy with no penalty, no active min_tokens mask and no logprobs: the row's token is the raw argmax."""
    return (params.greedy and params.logprobs is None and len(output_token_ids) >= params.min_tokens
            and not params.has_penalties)


def token_counts(token_ids: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """How often each id occurs in each row: [R, V] fp32, from ragged lists in one scatter."""
    width = max((len(t) for t in token_ids), default=0)
    counts = torch.zeros(len(token_ids), vocab_size + 1, device=device)
    if width:
        # Pad with id V, a scratch column dropped below, so ragged rows scatter in one call.
        ids = to_device([t + [vocab_size] * (width - len(t)) for t in token_ids], device)
        counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens (divide positive logits, multiply negative ones), then
    frequency (x count) and presence (once) penalties over output tokens only, as in vLLM."""
    params = batch.params
    use_rep = any(p.repetition_penalty != 1.0 for p in params)
    use_out = any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params)
    if not (use_rep or use_out):
        return logits
    vocab, device = logits.shape[1], logits.device

    def column(values: list[float]) -> torch.Tensor:
        return to_device(values, device).unsqueeze(1)

    out_counts = token_counts(batch.output_token_ids, vocab, device)
    if use_rep:
        seen = (out_counts > 0) | (token_counts(batch.prompt_token_ids, vocab, device) > 0)
        rep = column([p.repetition_penalty for p in params])
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    if use_out:
        logits = logits - column([p.frequency_penalty for p in params]) * out_counts
        logits = logits - column([p.presence_penalty for p in params]) * (out_counts > 0)
    return logits


def apply_min_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Until a row has min_tokens outputs, its stop_token_ids and EOS ids (unless ignore_eos) get -inf."""
    rows: list[int] = []
    cols: list[int] = []
    for i, (p, out, eos) in enumerate(zip(batch.params, batch.output_token_ids, batch.eos_token_ids)):
        if len(out) < p.min_tokens:
            blocked = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos))
            rows += [i] * len(blocked)
            cols += sorted(blocked)
    if not rows:
        return logits
    logits = logits.clone()
    logits[to_device(rows, logits.device), to_device(cols, logits.device)] = _NEG_INF
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask to -inf all but each row's top_k logits (-1: all), then all but the smallest set of the rest whose
    probability reaches top_p (never empty). Sorts only when some row uses top_p; top_k alone needs a topk."""
    vocab, device = logits.shape[1], logits.device
    ks = [vocab if k < 1 or k >= vocab else k for k in top_k]
    k_col = to_device(ks, device).unsqueeze(1)
    if all(p >= 1.0 for p in top_p):
        if all(k == vocab for k in ks):
            return logits
        # topk up to the largest k in use; the row's k-th largest logit is its threshold (ties kept).
        kmax = max(k for k in ks if k < vocab)
        thresh = logits.topk(kmax, -1).values.gather(1, k_col.clamp(max=kmax) - 1)
        thresh = thresh.masked_fill(k_col >= vocab, _NEG_INF)
        return logits.masked_fill(logits < thresh, _NEG_INF)
    sorted_logits, order = logits.sort(-1, descending=True)
    sorted_logits = sorted_logits.masked_fill(torch.arange(vocab, device=device) >= k_col, _NEG_INF)
    probs = sorted_logits.softmax(-1)
    # Keep a token while the mass ranked before it is below top_p; rows with top_p 1 get +inf (no rounding loss).
    p_col = to_device([p if p < 1.0 else float("inf") for p in top_p], device).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(probs.cumsum(-1) - probs >= p_col, _NEG_INF)
    return torch.full_like(logits, _NEG_INF).scatter(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's largest probability."""
    if all(m <= 0.0 for m in min_p):
        return logits
    probs = logits.softmax(-1)
    floor = to_device(min_p, logits.device).unsqueeze(1) * probs.amax(-1, keepdim=True)
    return logits.masked_fill(probs < floor, _NEG_INF)


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, nums: Sequence[int | None]
) -> LogprobTensors | None:
    """logprobs [R, V] (log_softmax of raw logits), token_ids [R]: the rows whose num is not None, if any."""
    rows = [i for i, n in enumerate(nums) if n is not None]
    if not rows:
        return None
    if len(rows) < len(nums):
        index = to_device(rows, logprobs.device)
        logprobs, token_ids = logprobs[index], token_ids[index]
    return _logprob_tensors(logprobs, token_ids, rows, [nums[i] for i in rows])


def compute_prompt_logprobs(
    logits: torch.Tensor, target_token_ids: torch.Tensor | Sequence[int], num: int
) -> list[LogprobsEntry]:
    """logits [L, V] at prompt positions 0..L-1; target_token_ids [L]: the prompt token that follows each
    position. Returns L entries (the caller puts None first for the unpredicted first prompt token)."""
    logprobs = logits.float().log_softmax(-1)
    targets = torch.as_tensor(target_token_ids, dtype=torch.long, device=logits.device)
    rows = list(range(logits.shape[0]))
    return _logprob_tensors(logprobs, targets, rows, [num] * len(rows)).entries(len(rows))


def _logprob_tensors(logprobs: torch.Tensor, token_ids: torch.Tensor, rows: list[int],
                     nums: list[int]) -> LogprobTensors:
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > chosen).sum(-1) + 1
    k = min(max(nums, default=0), logprobs.shape[1])
    top_lp, top_ids = logprobs.topk(k, -1)
    return LogprobTensors(rows, nums, token_ids, chosen.squeeze(1), ranks, top_ids, top_lp)
