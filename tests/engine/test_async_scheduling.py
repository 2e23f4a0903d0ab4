"""Async scheduling (llm_engine.py): step N+1 is scheduled and launched before step N's tokens are processed.

Outputs must equal the synchronous engine's token for token and text for text (greedy and seeded sampling, n = 2,
stop strings, stop tokens, EOS, max_tokens, logprobs, penalties and min_tokens (which fall back to synchronous
steps), chunked prefill, prefix hits, preemption, aborts), leak no KV block, and really overlap: launch N+1 before
the host reads step N's tokens. The tiny random Llama runs with the embedded model's tokenizer, so its outputs have
texts (ids < 256 are bytes and specials), and a frequent token is made its EOS."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from quantkit import LLM, SamplingParams
from quantkit.config import EngineConfig
from quantkit.engine.llm_engine import LLMEngine
from quantkit.outputs import RequestOutput

# Frequent in the tiny model's outputs (tokens) and texts.
EOS, STOP_TOKENS, STOP_STRINGS = 77, [117, 30, 43, 120], ["t", "W", "?", "."]


def tiny_llm(model_dir, tokenizer, async_scheduling: bool, **kwargs) -> LLM:
    options = dict(device="cpu", tokenizer=str(tokenizer), block_size=8, max_model_len=256, max_num_seqs=16,
                   num_kv_blocks=128)
    return LLM(str(model_dir), async_scheduling=async_scheduling, **{**options, **kwargs})


@pytest.fixture(scope="module")
def model(small_llama_dir, embedded_source, tmp_path_factory):
    """The tiny Llama with EOS set to one of its frequent tokens, and the embedded model's tokenizer."""
    path = tmp_path_factory.mktemp("tiny_eos") / "model"
    shutil.copytree(small_llama_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": EOS}))
    return path, embedded_source.path


def workload(num: int, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts, a third of them on a shared 24-token prefix (prefix hits), with every kind of sampling and stop."""
    rng = random.Random(seed)
    shared = [rng.randrange(20, 256) for _ in range(24)]
    prompts, params = [], []
    for i in range(num):
        tail = [rng.randrange(20, 256) for _ in range(rng.randint(1, 30))]
        prompts.append(shared + tail if i % 3 == 0 else tail)
        max_tokens = rng.randint(1, 24)
        kind = i % 8
        common = dict(max_tokens=max_tokens, seed=i)
        params.append([
            SamplingParams(temperature=0.0, **common),  # EOS stops
            SamplingParams(temperature=0.8, top_p=0.9, top_k=40, stop_token_ids=STOP_TOKENS, **common),
            SamplingParams(temperature=1.0, n=2, **common),
            SamplingParams(temperature=0.0, stop=STOP_STRINGS, include_stop_str_in_output=i % 2 == 1, **common),
            SamplingParams(temperature=0.7, logprobs=2, stop_token_ids=STOP_TOKENS, **common),
            SamplingParams(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.5, **common),
            SamplingParams(temperature=0.0, min_tokens=min(3, max_tokens), prompt_logprobs=1, **common),
            SamplingParams(temperature=1.0, n=2, stop=STOP_STRINGS, ignore_eos=True, **common),
        ][kind])
    return prompts, params


def summary(outputs: list[RequestOutput]) -> list:
    """Everything that must not depend on the scheduling mode, logprobs rounded (batches differ in shape)."""
    def logprobs(entries):
        return None if entries is None else [
            {t: (round(lp.logprob, 4), lp.rank) for t, lp in e.items()} if e is not None else None for e in entries]
    return [(o.request_id, o.prompt_token_ids, logprobs(o.prompt_logprobs),
             [(c.token_ids, c.text, c.finish_reason, c.stop_reason, logprobs(c.logprobs)) for c in o.outputs])
            for o in outputs]


def assert_clean(engine: LLMEngine) -> None:
    kv = engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks and all(b.ref_cnt == 0 for b in kv.block_pool.blocks)
    assert not engine.has_unfinished_requests() and not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.runner.tables.num_rows_in_use == 0 and not engine.runner._generators and not kv._states


@pytest.mark.parametrize("options", [
    {},
    {"max_num_batched_tokens": 16, "max_num_seqs": 8},   # chunked prefill beside decodes
    {"num_kv_blocks": 14},                                 # preemption (recompute)
    {"enable_prefix_caching": False},
], ids=["roomy", "chunked", "preempting", "no-prefix-cache"])
def test_async_outputs_equal_sync(model, options):
    prompts, params = workload(40)
    results = {}
    for mode in (False, True):
        llm = tiny_llm(*model, async_scheduling=mode, **options)
        results[mode] = summary(llm.generate(prompts, params, use_tqdm=False))
        assert_clean(llm.llm_engine)
        sched = llm.llm_engine.scheduler
        assert (sched.num_preemptions_total > 0) == ("num_kv_blocks" in options)
        assert (sched.prefix_cache_hit_tokens > 0) == (options.get("enable_prefix_caching", True))
    assert results[True] == results[False]
    reasons = {(c[2], type(c[3]).__name__) for o in results[True] for c in o[3]}
    # EOS, a stop token, a stop string and max_tokens all ended some completion.
    assert {("stop", "NoneType"), ("stop", "int"), ("stop", "str"), ("length", "NoneType")} <= reasons


def run_with_aborts(engine: LLMEngine, prompts, params,
                    abort_at: dict[int, list[int]]) -> tuple[dict[str, RequestOutput], int]:
    """Steps until done, aborting the requests `abort_at[step]` before that step. Returns the final outputs and
    how many aborted requests had a step in flight."""
    ids = [engine.add_request(p, sp, request_id=str(i)) for i, (p, sp) in enumerate(zip(prompts, params))]
    finished: dict[str, RequestOutput] = {}
    step = in_flight = 0
    while engine.has_unfinished_requests():
        for i in abort_at.get(step, []):
            if engine._in_flight is not None:
                in_flight += any(s.request.parent_id == ids[i] for s in engine._in_flight.scheduled.scheduled)
            finished.update((o.request_id, o) for o in engine.abort_request(ids[i]))
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
        step += 1
    return finished, in_flight


@pytest.mark.parametrize("num_kv_blocks", [128, 14], ids=["roomy", "preempting"])
def test_aborts_with_a_step_in_flight(model, num_kv_blocks):
    prompts, params = workload(24, seed=1)
    # Nothing ends them before their abort.
    params = [SamplingParams(**{**p.__dict__, "max_tokens": 24, "ignore_eos": True, "stop": [], "stop_token_ids": []})
              for p in params]
    abort_at = {3: [0, 2], 6: [5], 9: [10, 11], 12: [1]}
    aborted = {str(i) for ids in abort_at.values() for i in ids}
    expected = summary(tiny_llm(*model, async_scheduling=False).generate(prompts, params, use_tqdm=False))
    expected = {o[0]: o for o in expected}
    for mode in (False, True):
        engine = tiny_llm(*model, async_scheduling=mode, num_kv_blocks=num_kv_blocks).llm_engine
        finished, in_flight = run_with_aborts(engine, prompts, params, abort_at)
        assert (in_flight > 0) == mode
        got = {rid: summary([o])[0] for rid, o in finished.items()}
        assert got.keys() == expected.keys()
        for rid, out in got.items():
            if rid not in aborted:
                assert out == expected[rid]
                continue
            for (tokens, _, reason, *_), (full, *_) in zip(out[3], expected[rid][3]):
                assert reason == "abort" and tokens == full[:len(tokens)]
        assert_clean(engine)


def spy_on_runner(engine: LLMEngine) -> list[tuple[str, int]]:
    """Logs ("launch", k) and ("wait", k) for every step k the runner launches and the engine waits for."""
    runner, log, steps = engine.runner, [], []
    launch, wait = runner.launch, runner.wait

    def spy_launch(out):
        steps.append(launch(out))  # kept alive: ids stay unique
        log.append(("launch", len(steps) - 1))
        return steps[-1]

    def spy_wait(step):
        log.append(("wait", next(k for k, s in enumerate(steps) if s is step)))
        return wait(step)
    runner.launch, runner.wait = spy_launch, spy_wait
    return log


def waits_before_next_launch(log: list[tuple[str, int]]) -> list[int]:
    """Steps whose tokens the host read before the next step was launched (not overlapped)."""
    position = {event: i for i, event in enumerate(log)}
    return [k for kind, k in log if kind == "wait" and position.get(("launch", k + 1), len(log)) > position[
        ("wait", k)]]


def test_steps_overlap(model):
    """Greedy, seeded top-k/top-p, stop strings, stop tokens, logprobs, chunked prefill: every step but the last
    is launched before the previous one's tokens are read, and each step's tokens are read once."""
    prompts, params = workload(32)
    plain = [p for p in params if p.n == 1 and p.repetition_penalty == 1.0 and not p.min_tokens]
    llm = tiny_llm(*model, async_scheduling=True, max_num_batched_tokens=32)
    log = spy_on_runner(llm.llm_engine)
    llm.generate(prompts[:len(plain)], plain, use_tqdm=False)
    launched = [k for kind, k in log if kind == "launch"]
    waited = [k for kind, k in log if kind == "wait"]
    assert len(launched) > 20 and waited == sorted(set(waited)) and set(waited) <= set(launched)
    assert waits_before_next_launch(log) == waited[-1:]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=1.2, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8, ignore_eos=True),
], ids=["penalty", "min_tokens"])
def test_steps_that_read_outputs_do_not_overlap(model, params):
    """Penalties read a request's output tokens while sampling, min_tokens their count: the step before must be
    processed first (min_tokens only until it is reached, when the last step may overlap)."""
    llm = tiny_llm(*model, async_scheduling=True)
    log = spy_on_runner(llm.llm_engine)
    llm.generate([[5, 6, 7]], params, use_tqdm=False)
    waited = [k for kind, k in log if kind == "wait"]
    assert len(waited) == 8 and len(waits_before_next_launch(log)) >= 7


def test_sync_mode_reads_each_step_before_the_next(model):
    llm = tiny_llm(*model, async_scheduling=False)
    log = spy_on_runner(llm.llm_engine)
    llm.generate([[5, 6, 7], [8, 9]], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    waited = [k for kind, k in log if kind == "wait"]
    assert len(waited) == 6 and waits_before_next_launch(log) == waited


def test_config_default_and_errors():
    assert EngineConfig("m").async_scheduling is True
    with pytest.raises(ValueError, match="async_scheduling='off' must be True or False"):
        EngineConfig("m", async_scheduling="off")


@pytest.mark.gpu
def test_decode_launch_never_waits_for_the_gpu():
    """On CUDA the launch of a decode step (placeholder inputs, graph replay, sampling with seeds, top-k/top-p and
    logprobs, copies to the host) must not synchronize: the host would wait for the step in flight."""
    llm = LLM("smollm2-135m", load_format="dummy", skip_tokenizer_init=True, device="cuda", max_model_len=512,
              max_num_seqs=16, num_kv_blocks=512, async_scheduling=True)
    engine = llm.llm_engine
    launch, checked = engine.runner.launch, []

    def strict_launch(out):
        if not all(s.num_new_tokens == 1 for s in out.scheduled):
            return launch(out)  # prefills: the eager forward is not what this test is about
        checked.append(len(out.scheduled))
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(out)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    engine.runner.launch = strict_launch
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.0, logprobs=2, max_tokens=12, ignore_eos=True)]
    outputs = llm.generate([[10 + i] * (5 + i) for i in range(6)], params * 2, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outputs) and len(checked) >= 10
