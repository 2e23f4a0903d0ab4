"""End-to-end engine tests on the embedded model: exactness against transformers, batch invariance (batching,
chunked prefill, preemption), prefix caching, parallel sampling, and input validation."""
import pytest
import torch

from quantkit import LLM, RequestOutputKind, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:\n",
    "def fibonacci(n):",
    "In 1969, the first humans",
    "Photosynthesis is the process by which plants",
    "My favourite recipe for pancakes needs",
    "The three laws of thermodynamics state that",
    "Once upon a time, in a kingdom far away, there lived a",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def make_llm(**kwargs) -> LLM:
    return LLM("smollm2-135m", device="cpu", dtype="float32", max_model_len=512, **kwargs)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return make_llm(num_kv_blocks=256)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_matches_transformers(llm):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(str(llm.llm_engine.source.path), dtype=torch.float32)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    prompts = PROMPTS[:3]
    ours = token_ids(llm.generate(prompts, params, use_tqdm=False))
    tok = llm.get_tokenizer()
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([tok(prompt).input_ids])
        expected = ref.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=2)
        assert got == expected[0, ids.shape[1]:].tolist()


def test_chat_greedy_matches_transformers(llm):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(str(llm.llm_engine.source.path), dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    expected = ref.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
    assert out.prompt_token_ids == ids[0].tolist()
    assert out.outputs[0].token_ids == expected[:len(out.outputs[0].token_ids)]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"


def test_batch_invariance_alone_vs_batched(llm):
    batch = (PROMPTS * 2)[:16]
    batched = token_ids(llm.generate(batch, GREEDY, use_tqdm=False))
    for prompt, got in zip(PROMPTS[:4], batched[:4]):
        assert token_ids(llm.generate([prompt], GREEDY, use_tqdm=False))[0] == got
    assert batched[:8] == batched[8:]


def test_chunked_prefill_tiny_budget_and_preemption(llm):
    expected = token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    chunked = make_llm(num_kv_blocks=256, max_num_batched_tokens=5, max_num_seqs=4)
    assert token_ids(chunked.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    tiny = make_llm(num_kv_blocks=6, block_size=16)
    assert token_ids(tiny.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    assert tiny.llm_engine.scheduler.num_preemptions_total > 0
    assert tiny.llm_engine.scheduler.kv.num_free_blocks == 6


def test_prefix_caching_computes_only_new_tokens():
    llm = make_llm(num_kv_blocks=128)
    engine = llm.llm_engine
    shared = "You are a helpful assistant. " * 12
    first = llm.generate([shared + "Tell me about cats."], GREEDY, use_tqdm=False)[0]
    computed_before = engine.num_computed_tokens_total
    second = llm.generate([shared + "Tell me about dogs."], GREEDY, use_tqdm=False)[0]
    prompt_len = len(second.prompt_token_ids)
    cached = second.num_cached_tokens
    assert cached >= 48 and cached % 16 == 0
    # Prefill computes only the uncached tail, then one token per decode step.
    assert engine.num_computed_tokens_total - computed_before == prompt_len - cached + GREEDY.max_tokens - 1
    assert engine.scheduler.prefix_cache_hit_rate > 0
    fresh = make_llm(num_kv_blocks=128, enable_prefix_caching=False)
    assert token_ids(fresh.generate([shared + "Tell me about dogs."], GREEDY, use_tqdm=False)) == \
        [second.outputs[0].token_ids]
    assert first.num_cached_tokens == 0


def test_kernel_warm_up_leaves_no_trace():
    """The throwaway requests a GPU engine runs at start-up (run here on CPU): afterwards every block is free, the
    prefix cache and the counters are empty, and the engine generates what a fresh one does."""
    llm = make_llm(num_kv_blocks=64, max_num_seqs=8)  # a 1,024-token pool: the long warm-up prompt shrinks to fit
    engine = llm.llm_engine
    engine._compile_kernels()
    pool = engine.scheduler.kv.block_pool
    assert pool.num_free_blocks == pool.num_blocks and not pool.cached and pool.num_query_tokens == 0
    assert engine.num_computed_tokens_total == 0 and not engine.has_unfinished_requests()
    fresh = make_llm(num_kv_blocks=64, max_num_seqs=8)
    assert token_ids(llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False)) == \
        token_ids(fresh.generate(PROMPTS[:3], GREEDY, use_tqdm=False))


def test_parallel_sampling_shares_prompt_and_is_seeded(llm):
    params = SamplingParams(temperature=1.0, max_tokens=16, n=3, seed=7, ignore_eos=True)
    out = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0]
    assert len(out.outputs) == 3 and [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    single = llm.generate(PROMPTS[:1], SamplingParams(temperature=1.0, max_tokens=16, seed=7, ignore_eos=True),
                          use_tqdm=False)[0]
    assert single.outputs[0].token_ids == out.outputs[0].token_ids
    assert llm.llm_engine.scheduler.kv.num_free_blocks == 256


def test_seed_is_independent_of_batch(llm):
    seeded = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=16, seed=123, ignore_eos=True)
    alone = token_ids(llm.generate([PROMPTS[2]], seeded, use_tqdm=False))[0]
    others = SamplingParams(temperature=1.0, max_tokens=16)
    mixed = llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1]], [others, seeded, others], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone


def test_stop_string_cuts_text_exactly(llm):
    free = llm.generate([PROMPTS[7]], GREEDY, use_tqdm=False)[0].outputs[0].text
    word = free.split()[2]
    out = llm.generate([PROMPTS[7]], SamplingParams(temperature=0.0, max_tokens=24, stop=[word]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == free[:free.index(word)]
    assert out.finish_reason == "stop" and out.stop_reason == word
    kept = llm.generate([PROMPTS[7]], SamplingParams(temperature=0.0, max_tokens=24, stop=[word],
                                                     include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.outputs[0].text == free[:free.index(word) + len(word)]


def test_logprobs_and_prompt_logprobs_match_full_forward(llm):
    from quantkit.layers.attention import AttentionMetadata
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    out = llm.generate([PROMPTS[4]], params, use_tqdm=False)[0]
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    model = llm.llm_engine.model
    with torch.no_grad():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.for_prefill([len(ids)]))
        logprobs = model.compute_logits(hidden).log_softmax(-1)
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(out.prompt_token_ids)):
        entry = out.prompt_logprobs[pos][ids[pos]]
        assert entry.logprob == pytest.approx(logprobs[pos - 1, ids[pos]].item(), abs=1e-4)
        assert entry.rank == int((logprobs[pos - 1] > logprobs[pos - 1, ids[pos]]).sum()) + 1
    sample = out.outputs[0]
    for step, position in enumerate(sample.logprobs):
        row = logprobs[len(out.prompt_token_ids) - 1 + step]
        token = sample.token_ids[step]
        assert position[token].rank == 1 and position[token].logprob == pytest.approx(row.max().item(), abs=1e-4)
        assert len(position) == 3
    assert sample.cumulative_logprob == pytest.approx(sum(p[t].logprob for p, t in zip(sample.logprobs,
                                                                                         sample.token_ids)))


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"), (dict(top_k=-2), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(presence_penalty=-3.0), "presence_penalty"),
    (dict(output_kind=1), "output_kind"),  # vLLM's DELTA
])
def test_invalid_sampling_params_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_leave_engine_usable(llm):
    engine = llm.llm_engine
    free = engine.scheduler.kv.num_free_blocks
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["ok prompt", ""], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(["word " * 600], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 2, 10**9]], GREEDY, use_tqdm=False)
    assert not engine.has_unfinished_requests() and engine.scheduler.kv.num_free_blocks == free
    assert len(llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 24


def test_abort_frees_blocks_at_once(llm):
    engine = llm.llm_engine
    free = engine.scheduler.kv.num_free_blocks
    rid = engine.add_request(PROMPTS[6], SamplingParams(max_tokens=100, n=2, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.scheduler.kv.num_free_blocks < free
    outs = engine.abort_request(rid)
    assert outs[0].finished and all(c.finish_reason == "abort" for c in outs[0].outputs)
    assert engine.scheduler.kv.num_free_blocks == free and not engine.has_unfinished_requests()


def test_final_only_outputs_once_and_equals_cumulative(llm):
    """FINAL_ONLY (what LLM.generate asks for) returns nothing while the request runs and, when it finishes, the
    output a CUMULATIVE request ends with; n = 2 and a stop string included. generate leaves the caller's params
    as they were."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=12, stop=["\n\n"])
    finals = {}
    for kind in RequestOutputKind:
        rid = engine.add_request(PROMPTS[1], SamplingParams(**{**params.__dict__, "output_kind": kind}))
        outputs = []
        while engine.has_unfinished_requests():
            outputs += [o for o in engine.step() if o.request_id == rid]
        assert outputs[-1].finished and all(not o.finished for o in outputs[:-1])
        if kind == RequestOutputKind.FINAL_ONLY:
            assert len(outputs) == 1
        else:
            assert len(outputs) > 1
        finals[kind] = [(c.text, c.token_ids, c.finish_reason) for c in outputs[-1].outputs]
    assert finals[RequestOutputKind.FINAL_ONLY] == finals[RequestOutputKind.CUMULATIVE]
    assert llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0].token_ids == finals[
        RequestOutputKind.CUMULATIVE][0][1]
    assert params.output_kind == RequestOutputKind.CUMULATIVE
