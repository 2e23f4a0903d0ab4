"""Sampler: each SamplingParams field's effect on fresh random logits, logprobs, seeds and distributions."""
from __future__ import annotations

import pytest
import torch

from quantkit.layers.sampler import (
    Sampler,
    SamplingBatch,
    apply_min_p,
    apply_min_tokens,
    apply_penalties,
    apply_top_k_top_p,
    compute_prompt_logprobs,
)
from quantkit.sampling_params import SamplingParams


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def make_batch(params, outputs=None, prompts=None, eos=None, generators=None) -> SamplingBatch:
    rows = len(params)
    return SamplingBatch(
        params=params,
        generators=generators or [None] * rows,
        prompt_token_ids=prompts or [[] for _ in range(rows)],
        output_token_ids=outputs or [[] for _ in range(rows)],
        eos_token_ids=eos or [frozenset() for _ in range(rows)],
    )


def sample(logits, params, seed=0, **kw):
    return Sampler(torch.Generator().manual_seed(seed))(logits, make_batch(params, **kw))


def test_temperature_zero_is_argmax():
    logits = randn(6, 50, seed=1)
    for temperature in (0.0, 1e-6):
        out = sample(logits, [SamplingParams(temperature=temperature) for _ in range(6)])
        assert out.token_ids.dtype == torch.int64
        assert torch.equal(out.token_ids, logits.argmax(-1))


def test_top_k_one_is_greedy_whatever_the_temperature():
    logits = randn(8, 50, seed=2)
    for seed in range(3):
        out = sample(logits, [SamplingParams(temperature=2.0, top_k=1) for _ in range(8)], seed=seed)
        assert torch.equal(out.token_ids, logits.argmax(-1))


def test_top_k_never_samples_outside_the_top_k():
    row = randn(1, 40, seed=3)
    out = sample(row.expand(3000, -1), [SamplingParams(temperature=3.0, top_k=5)] * 3000)
    allowed = set(row[0].topk(5).indices.tolist())
    assert set(out.token_ids.tolist()) == allowed  # never outside, and it does sample all five


def _expected_nucleus(row: torch.Tensor, top_p: float) -> set[int]:
    probs, ids = row.softmax(-1).sort(descending=True)
    kept, total = set(), 0.0
    for prob, token in zip(probs.tolist(), ids.tolist()):
        kept.add(token)
        total += prob
        if total >= top_p:
            return kept
    return kept


@pytest.mark.parametrize("top_p", [1e-4, 0.3, 0.75, 0.95])
def test_top_p_keeps_the_smallest_set_reaching_top_p(top_p):
    logits = randn(5, 30, seed=4, scale=2.0)
    masked = apply_top_k_top_p(logits, [-1] * 5, [top_p] * 5)
    for row, out_row in zip(logits, masked):
        assert set(torch.isfinite(out_row).nonzero().flatten().tolist()) == _expected_nucleus(row, top_p)
        kept = torch.isfinite(out_row)
        assert torch.equal(out_row[kept], row[kept])  # survivors keep their value


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    logits = randn(1, 30, seed=5, scale=2.0)
    masked = apply_top_k_top_p(logits, [6], [0.8])
    top6 = torch.full_like(logits[0], float("-inf"))
    top6[logits[0].topk(6).indices] = logits[0][logits[0].topk(6).indices]
    kept = set(torch.isfinite(masked[0]).nonzero().flatten().tolist())
    assert kept == _expected_nucleus(top6, 0.8)


def test_top_k_rows_mix_with_disabled_rows_and_skip_the_sort(monkeypatch):
    logits = randn(3, 30, seed=6)
    monkeypatch.setattr(torch.Tensor, "sort", lambda *a, **k: pytest.fail("top_k alone must not sort"))
    masked = apply_top_k_top_p(logits, [3, -1, 10], [1.0, 1.0, 1.0])
    assert torch.isfinite(masked).sum(-1).tolist() == [3, 30, 10]
    assert set(torch.isfinite(masked[0]).nonzero().flatten().tolist()) == set(logits[0].topk(3).indices.tolist())
    assert apply_top_k_top_p(logits, [-1] * 3, [1.0] * 3) is logits  # nothing enabled: no work at all


def test_top_p_sampling_stays_inside_the_nucleus():
    row = randn(1, 30, seed=7, scale=2.0)
    out = sample(row.expand(2000, -1), [SamplingParams(top_p=0.6)] * 2000)
    assert set(out.token_ids.tolist()) <= _expected_nucleus(row[0], 0.6)


def test_min_p_drops_tokens_below_the_scaled_max_probability():
    logits = randn(4, 40, seed=8, scale=2.0)
    min_p = [0.0, 0.05, 0.2, 0.9]
    masked = apply_min_p(logits, min_p)
    probs = logits.softmax(-1)
    for i, m in enumerate(min_p):
        expected = probs[i] >= m * probs[i].max()
        assert torch.equal(torch.isfinite(masked[i]), expected)
    row = logits[2:3]
    out = sample(row.expand(2000, -1), [SamplingParams(min_p=0.2)] * 2000)
    allowed = set((probs[2] >= 0.2 * probs[2].max()).nonzero().flatten().tolist())
    assert set(out.token_ids.tolist()) == allowed


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = randn(2, 20, seed=9)
    positive = [t for t in range(20) if logits[0, t] > 0]
    negative = [t for t in range(20) if logits[0, t] < 0]
    prompt, output = [positive[0], negative[0]], [positive[1], negative[1], negative[1]]
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams()]
    got = apply_penalties(logits, make_batch(params, outputs=[output, output], prompts=[prompt, prompt]))
    expected = logits.clone()
    for t in set(prompt + output):
        expected[0, t] = logits[0, t] / 1.5 if logits[0, t] > 0 else logits[0, t] * 1.5
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = randn(1, 20, seed=10)
    prompt, output = [1, 2], [3, 3, 3, 4]
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)]
    got = apply_penalties(logits, make_batch(params, outputs=[output], prompts=[prompt]))
    expected = logits.clone()
    expected[0, 3] -= 3 * 0.5 + 0.25
    expected[0, 4] -= 1 * 0.5 + 0.25
    torch.testing.assert_close(got, expected)


def test_penalties_steer_greedy_choice():
    logits = randn(1, 20, seed=11)
    top = int(logits.argmax())
    params = [SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)]
    assert int(sample(logits, params, outputs=[[top] * 3]).token_ids) != top


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    logits = randn(1, 30, seed=12)
    eos, stop = 7, 11
    logits[0, eos], logits[0, stop] = 50.0, 40.0  # the two most likely tokens by far
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop])

    def run(n_out: int, p: SamplingParams = params) -> tuple[int, torch.Tensor]:
        batch = make_batch([p], outputs=[[1] * n_out], eos=[frozenset({eos})])
        return int(Sampler()(logits, batch).token_ids), apply_min_tokens(logits, batch)
    token, masked = run(2)
    assert token not in (eos, stop) and masked[0, eos] == masked[0, stop] == float("-inf")
    assert torch.isfinite(masked).sum() == 28
    assert run(3)[0] == eos  # reached: EOS is allowed again
    ignore = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop], ignore_eos=True)
    assert run(2, ignore)[0] == eos  # ignore_eos: EOS does not stop, so it is not blocked; the stop id is
    assert run(2, ignore)[1][0, stop] == float("-inf")


def _seeded_run(seed_row: int, rows: int, steps: int, seed: int = 1234) -> list[int]:
    """Sample `steps` tokens for a seeded request placed at row `seed_row` among other kinds of rows."""
    gen = torch.Generator().manual_seed(seed)
    sampler = Sampler(torch.Generator().manual_seed(seed_row + rows))
    others = [torch.Generator().manual_seed(99), None, None, torch.Generator().manual_seed(7)]
    tokens = []
    for step in range(steps):
        logits = randn(rows, 200, seed=1000 + step * 10 + rows)
        logits[seed_row] = randn(200, seed=step)  # the seeded request sees the same logits in every run
        params = [SamplingParams(temperature=0.0 if i == 1 else 1.0) for i in range(rows)]
        params[seed_row] = SamplingParams(temperature=1.0, seed=seed)
        generators = [others[i % 4] for i in range(rows)]
        generators[seed_row] = gen
        out = sampler(logits, make_batch(params, generators=generators))
        tokens.append(int(out.token_ids[seed_row]))
    return tokens


def test_seed_reproducible_regardless_of_batch_and_row():
    alone = _seeded_run(0, 1, 25)
    assert alone == _seeded_run(2, 4, 25) == _seeded_run(5, 7, 25)
    assert alone != _seeded_run(0, 1, 25, seed=4321)


def test_logprobs_come_from_raw_logits_with_ranks():
    logits = randn(3, 40, seed=13)
    params = [
        SamplingParams(temperature=0.7, repetition_penalty=1.8, top_k=5, logprobs=4),
        SamplingParams(logprobs=0),
        SamplingParams(),
    ]
    out = sample(logits, params, outputs=[[int(logits[0].argmax())], [], []])
    raw = logits.log_softmax(-1)
    for i in (0, 1):
        entry, token = out.logprobs[i], int(out.token_ids[i])
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(float(raw[i, token]), abs=1e-6)
        assert entry.rank == 1 + int((raw[i] > raw[i, token]).sum())
    top = raw[0].topk(4)
    assert out.logprobs[0].top_token_ids == top.indices.tolist()
    assert out.logprobs[0].top_logprobs == pytest.approx(top.values.tolist(), abs=1e-6)
    assert out.logprobs[1].top_token_ids == [] and out.logprobs[2] is None
    as_dict = out.logprobs[0].to_dict(decode=str)
    assert next(iter(as_dict)) == out.logprobs[0].token_id  # sampled token first, as in vLLM
    assert [as_dict[t].rank for t in top.indices.tolist()] == [1, 2, 3, 4]
    assert as_dict[top.indices[0].item()].decoded_token == str(top.indices[0].item())


def test_prompt_logprobs_score_each_next_prompt_token():
    logits = randn(5, 30, seed=14)
    targets = [3, 17, 0, 29, 3]
    entries = compute_prompt_logprobs(logits, targets, num=2)
    raw = logits.log_softmax(-1)
    for i, (entry, target) in enumerate(zip(entries, targets)):
        assert entry.token_id == target
        assert entry.logprob == pytest.approx(float(raw[i, target]), abs=1e-6)
        assert entry.rank == 1 + int((raw[i] > raw[i, target]).sum())
        assert entry.top_token_ids == raw[i].topk(2).indices.tolist()


def _chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_distribution_matches_softmax(temperature):
    row = randn(1, 8, seed=15)
    draws = 4000
    probs = (row[0] / temperature).softmax(-1)
    shared = sample(row.expand(draws, -1), [SamplingParams(temperature=temperature)] * draws, seed=3)
    assert _chi_square(shared.token_ids, probs) < 30.0  # df = 7: p < 1e-4 beyond 30
    generators = [torch.Generator().manual_seed(i) for i in range(draws)]  # the per-row generator path
    seeded = sample(row.expand(draws, -1), [SamplingParams(temperature=temperature)] * draws, generators=generators)
    assert _chi_square(seeded.token_ids, probs) < 30.0


def test_forward_leaves_the_input_logits_alone():
    logits = randn(2, 30, seed=16)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=2.0, min_tokens=2, stop_token_ids=[1], top_p=0.5), SamplingParams()]
    sample(logits, params, outputs=[[2, 3], [4]])
    assert torch.equal(logits, before)


def test_shape_and_batch_mismatches_raise():
    with pytest.raises(ValueError, match="generators"):
        SamplingBatch([SamplingParams()], [], [[]], [[]], [frozenset()])
    with pytest.raises(ValueError, match="logits"):
        sample(randn(2, 10), [SamplingParams()])


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", 0),
        ("top_k", -2),
        ("min_p", 1.5),
        ("max_tokens", 0),
        ("n", 0),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("stop", [""]),
    ],
)
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} "):
        SamplingParams(**{field: value})
