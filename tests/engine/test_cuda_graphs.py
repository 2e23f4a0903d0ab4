"""Decode steps padded to CUDA-graph batch sizes. On CPU the padded batch runs eagerly (the computation a replay
performs) and must give the unpadded path's tokens exactly, with the torch attention backend and with the Triton
one under TRITON_INTERPRET=1; block tables must survive preemption, forks and prefix hits; and random aborts must
leak no KV block. Tests marked `gpu` capture real graphs and compare them with enforce_eager."""
from __future__ import annotations

import gc
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module is imported, as tests/kernels do

from quantkit import LLM, SamplingParams  # noqa: E402
from quantkit.engine.block_table import BlockTables  # noqa: E402
from quantkit.engine.cuda_graphs import DecodeGraphs, capture_sizes  # noqa: E402
from quantkit.engine.llm_engine import LLMEngine  # noqa: E402
from quantkit.engine.request import Request  # noqa: E402
from quantkit.kernels.base import BUCKETS  # noqa: E402

gpu = pytest.mark.gpu


def tiny_llm(model_dir, padded: bool, **kwargs) -> LLM:
    """The tiny random Llama on CPU; `padded` runs decode steps padded to the graph batch sizes."""
    options = dict(device="cpu", skip_tokenizer_init=True, block_size=8, max_model_len=256, max_num_seqs=20,
                   num_kv_blocks=128)
    llm = LLM(str(model_dir), **{**options, **kwargs})
    if padded:
        llm.llm_engine.runner.init_decode_graphs(capture=False)
    return llm


def spy_buckets(llm: LLM, monkeypatch) -> set[tuple[int, int]]:
    """(decode batch size, bucket) pairs the runner chose, filled as the engine runs."""
    graphs = llm.llm_engine.runner.graphs
    seen: set[tuple[int, int]] = set()
    bucket = graphs.bucket

    def spy(num_seqs: int) -> int | None:
        n = bucket(num_seqs)
        seen.add((num_seqs, n))
        return n
    monkeypatch.setattr(graphs, "bucket", spy)
    return seen


def token_ids(outputs) -> list[list[list[int]]]:
    return [[list(c.token_ids) for c in o.outputs] for o in outputs]


def mixed_workload(num: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts of many lengths and output lengths, so the decode batch shrinks through several buckets; greedy,
    seeded top-p, n=2 forks (copy-on-write) and logprobs."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))] for _ in range(num)]
    params = []
    for i in range(num):
        kind = i % 4
        max_tokens = 2 + (i * 7) % 19
        if kind == 1:
            params.append(SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=max_tokens, ignore_eos=True))
        elif kind == 2:
            params.append(SamplingParams(temperature=1.0, n=2, seed=i, max_tokens=max_tokens, ignore_eos=True))
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                         logprobs=2 if kind == 3 else None))
    return prompts, params


def test_capture_sizes_and_buckets():
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, *range(80, 257, 16)]
    # padding stays in its M bucket: every bucket bound a decode batch can reach is a capture size
    assert {b.max_m for b in BUCKETS if b.max_m and b.max_m <= 256} <= set(capture_sizes(256))
    assert {b.max_m for b in BUCKETS if b.max_m} <= set(capture_sizes(1024))
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20] and capture_sizes(1) == [1] and capture_sizes(3) == [1, 2, 3]
    graphs = DecodeGraphs(capture_sizes(20), lambda n: torch.zeros(n, 1))
    assert [graphs.bucket(b) for b in (1, 3, 5, 9, 17, 20, 21)] == [1, 4, 8, 16, 20, 20, None]
    assert graphs.run(4).shape == (4, 1) and graphs.num_steps == 1 and not graphs.captured
    with pytest.raises(ValueError, match="batch size"):
        graphs.run(5)


def test_block_tables_sync_only_what_can_change():
    tables = BlockTables(max_rows=1, max_blocks=4, block_size=4)
    req = Request("a", [1] * 6, SamplingParams())
    req.block_ids = [7, 8]
    row = tables.sync(req, 0)
    assert tables.table[row].tolist() == [7, 8, 0, 0]
    req.block_ids = [7, 9, 5]  # copy-on-write of block 1 (written from token 6 on) and a new block
    assert tables.sync(req, 6) == row and tables.table[row].tolist() == [7, 9, 5, 0]
    req.block_ids, req.num_preemptions = [3], 1  # preempted, readmitted with a prefix hit: all of it is new
    tables.sync(req, 4)
    assert tables.table[row, :1].tolist() == [3]
    other = Request("b", [1], SamplingParams(), block_ids=[2])
    assert tables.sync(other, 0) != row and tables.table.shape[0] == 2  # grown: one more row
    tables.release("a")
    tables.release("b")
    assert tables.num_rows_in_use == 0
    req.block_ids = [1] * 5
    with pytest.raises(ValueError, match="max_model_len"):
        tables.sync(req, 0)


def test_capture_inputs_are_all_padding(small_llama_dir):
    """What a graph is captured on (and its warm-up runs on): no KV write, one harmless key per sequence."""
    runner = tiny_llm(small_llama_dir, padded=False).llm_engine.runner
    views = runner._stage([], pad_to=4)
    host = {name: getattr(views, name)[0].tolist() for name in
            ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens")}
    assert host == {"input_ids": [0] * 4, "positions": [0] * 4, "slot_mapping": [-1] * 4,
                    "query_start_loc": [0, 1, 2, 3, 4], "seq_lens": [1] * 4}
    assert views.block_tables[1].shape == (4, 32) and not views.block_tables[1].any()


def test_padded_decode_matches_eager_torch_backend(small_llama_dir, monkeypatch):
    prompts, params = mixed_workload(13, 256)
    expected = token_ids(tiny_llm(small_llama_dir, padded=False).generate(prompts, params, use_tqdm=False))
    llm = tiny_llm(small_llama_dir, padded=True)
    seen = spy_buckets(llm, monkeypatch)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert token_ids(outputs) == expected
    assert any(b < n for b, n in seen) and len({n for _, n in seen}) >= 4  # padded, across buckets
    assert llm.llm_engine.runner.graphs.num_steps > 0


def test_padded_decode_survives_preemption_and_prefix_hits(small_llama_dir):
    """A pool too small for the batch: requests are preempted and come back with prefix hits on other blocks, so
    their block-table rows must be rewritten in full."""
    shared = list(range(3, 35))
    prompts = [shared + [40 + i] * (i % 5 + 1) for i in range(10)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = token_ids(tiny_llm(small_llama_dir, padded=False).generate(prompts, params, use_tqdm=False))
    llm = tiny_llm(small_llama_dir, padded=True, num_kv_blocks=24)
    assert token_ids(llm.generate(prompts, params, use_tqdm=False)) == expected
    engine = llm.llm_engine
    assert engine.scheduler.num_preemptions_total > 0 and engine.scheduler.prefix_cache_hit_tokens > 0
    assert engine.scheduler.kv.num_free_blocks == 24 and engine.runner.tables.num_rows_in_use == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run; on a GPU the graph tests cover Triton")
def test_padded_decode_matches_eager_triton_backend(small_llama_dir, monkeypatch):
    """The Triton kernels under the interpreter: padding rows (seq_len 1, slot -1) and segments sized from
    max_model_len, several of them empty for short contexts, must change nothing."""
    from quantkit.kernels import attention_triton
    assert attention_triton._segments(2, 256, 32, torch.device("cpu")) == 2  # fp32 tiles: bucket 1 splits in 2
    prompts = [[5, 6, 7], [9] * 9, [11], list(range(20, 37)), [3, 4, 5, 6, 7, 8]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (2, 3, 4, 5, 6)]
    expected = token_ids(tiny_llm(small_llama_dir, padded=False, attention_backend="triton")
                         .generate(prompts, params, use_tqdm=False))
    llm = tiny_llm(small_llama_dir, padded=True, attention_backend="triton")
    seen = spy_buckets(llm, monkeypatch)
    assert token_ids(llm.generate(prompts, params, use_tqdm=False)) == expected
    assert {n for _, n in seen} == {8, 4, 2, 1}


def run_with_aborts(engine: LLMEngine, num_requests: int, max_prompt: int, max_tokens: int, in_flight: int,
                    seed: int = 0) -> dict[str, object]:
    """Keeps `in_flight` requests going (greedy and seeded sampling, n = 1 or 2, some stopping at a token) and
    aborts a random one now and then, running or waiting; returns every request's final output."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    next_id, live, finished = 0, set(), {}
    while next_id < num_requests or engine.has_unfinished_requests():
        while next_id < num_requests and len(live) < in_flight:
            prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, max_prompt))]
            params = SamplingParams(n=rng.choice([1, 1, 1, 2]), temperature=rng.choice([0.0, 1.0]),
                                    seed=rng.choice([None, next_id]), max_tokens=rng.randint(1, max_tokens),
                                    stop_token_ids=[rng.randrange(3, vocab)], ignore_eos=True)
            live.add(engine.add_request(prompt, params, request_id=str(next_id)))
            next_id += 1
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
                live.discard(out.request_id)
        if live and rng.random() < 0.1:
            victim = rng.choice(sorted(live))
            for out in engine.abort_request(victim):
                finished[out.request_id] = out
            live.discard(victim)
    return finished


def assert_nothing_leaked(engine: LLMEngine, finished: dict, num_requests: int) -> None:
    assert len(finished) == num_requests and all(o.finished for o in finished.values())
    reasons = {c.finish_reason for o in finished.values() for c in o.outputs}
    assert {"abort", "length"} <= reasons <= {"abort", "length", "stop"}
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks
    assert not engine.has_unfinished_requests() and not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.runner.tables.num_rows_in_use == 0 and not engine.runner._generators
    assert engine.scheduler.num_preemptions_total > 0 and engine.runner.graphs.num_steps > 0


def test_random_aborts_leak_nothing(small_llama_dir):
    engine = tiny_llm(small_llama_dir, padded=True, max_num_seqs=16, num_kv_blocks=40).llm_engine
    finished = run_with_aborts(engine, 300, max_prompt=40, max_tokens=24, in_flight=24)
    assert_nothing_leaked(engine, finished, 300)


# ---- GPU: real graphs --------------------------------------------------------------------------------------------

def gpu_llm(**kwargs) -> LLM:
    """The SmolLM2-135M shape with dummy weights: 30 layers, so a graph replaces many launches."""
    options = dict(load_format="dummy", skip_tokenizer_init=True, device="cuda", max_model_len=1024,
                   max_num_seqs=48, num_kv_blocks=2048)
    return LLM("smollm2-135m", **{**options, **kwargs})


def gpu_generate(prompts, params, **kwargs) -> tuple[list, dict[str, int]]:
    llm = gpu_llm(**kwargs)
    engine = llm.llm_engine
    outputs = llm.generate(prompts, params, use_tqdm=False)
    graphs = engine.runner.graphs
    stats = {"graph_steps": graphs.num_steps if graphs is not None else 0,
             "preemptions": engine.scheduler.num_preemptions_total,
             "leaked_blocks": engine.scheduler.kv.num_blocks - engine.scheduler.kv.num_free_blocks}
    del llm, engine, graphs
    gc.collect()
    torch.cuda.empty_cache()
    return outputs, stats


def gpu_workload(num: int, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts of 1..300 tokens (chunked prefill beside decodes) and 1..40 outputs: the decode batch crosses the
    buckets on its way down. logprobs=2 lets a divergence be checked for a near tie."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, 49000) for _ in range(rng.randint(1, 300))] for _ in range(num)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 40), logprobs=2, ignore_eos=True)
              for _ in range(num)]
    return prompts, params


def assert_same_or_near_tie(expected, outputs, tol: float) -> None:
    """Greedy tokens agree, except that a sequence may part ways at a near tie: where the two first differ, the
    token taken must be within `tol` logprob of the reference's choice in the reference's own distribution.
    Padding or a graph changes the batch shapes, hence the rounding, which can flip a tie; a wrong KV read or a
    padding row leaking into real rows flips clear winners. Nothing after the first difference is compared."""
    for i, (ref, out) in enumerate(zip(expected, outputs)):
        ref, out = ref.outputs[0], out.outputs[0]
        assert len(ref.token_ids) == len(out.token_ids)
        for pos, (a, b) in enumerate(zip(ref.token_ids, out.token_ids)):
            if a != b:
                top = ref.logprobs[pos]
                assert b in top and top[a].logprob - top[b].logprob < tol, \
                    f"sequence {i} token {pos}: {b} instead of {a}, not a near tie ({top})"
                break


@gpu
@pytest.mark.parametrize("dtype, kv_cache_dtype, tol", [("float32", "auto", 1e-2), ("bfloat16", "fp8", 0.1)],
                         ids=["fp32", "bf16-kv-fp8"])
def test_graphs_match_eager(dtype, kv_cache_dtype, tol):
    prompts, params = gpu_workload(40)
    eager, eager_stats = gpu_generate(prompts, params, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                                      enforce_eager=True)
    graphed, stats = gpu_generate(prompts, params, dtype=dtype, kv_cache_dtype=kv_cache_dtype)
    assert eager_stats["graph_steps"] == 0 and stats["graph_steps"] > 20
    assert_same_or_near_tie(eager, graphed, tol)


@gpu
def test_graphs_keep_outputs_through_preemption():
    prompts, params = gpu_workload(16, seed=1)
    prompts = [p[:100] for p in prompts]
    roomy, _ = gpu_generate(prompts, params, dtype="float32")
    tight, stats = gpu_generate(prompts, params, dtype="float32", num_kv_blocks=40)
    assert stats["preemptions"] > 0 and stats["graph_steps"] > 0 and stats["leaked_blocks"] == 0
    assert_same_or_near_tie(roomy, tight, 1e-2)


@gpu
def test_graphs_random_aborts_leak_nothing():
    engine = gpu_llm(max_num_seqs=64, num_kv_blocks=256, max_model_len=512).llm_engine
    assert engine.runner.graphs.captured
    finished = run_with_aborts(engine, 2000, max_prompt=200, max_tokens=64, in_flight=96)
    assert_nothing_leaked(engine, finished, 2000)


@gpu
def test_graphs_share_one_logits_buffer():
    """Every graph writes its logits into the rows of the largest one's output: one [max, vocab] buffer, not one
    per size (which took 17 GB at 1,024 sequences of a 128k vocabulary)."""
    graphs = gpu_llm(max_num_seqs=64, num_kv_blocks=256, max_model_len=512).llm_engine.runner.graphs
    outputs = {n: out for n, (_, out) in graphs._graphs.items()}
    largest = outputs[max(outputs)]
    assert all(out.data_ptr() == largest.data_ptr() and out.shape[0] == n for n, out in outputs.items())
