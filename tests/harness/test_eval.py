"""Evaluation harness: perplexity equals transformers' on the same held-out windows; a model against its own
reference has KL 0 and agreement 1; an FP8 KV cache really changes the numbers (the windows go through the paged
cache); the top-k KL is exact at k = vocab and a lower bound below it."""
from __future__ import annotations

import pytest
import torch

from quantkit import LLM
from quantkit.harness import eval as harness_eval
from quantkit.harness.eval import (
    EvalConfig,
    eval_inputs,
    evaluate,
    kl_top_k,
    load_or_compute_reference,
)

ENGINE = {"device": "cpu", "dtype": "float32", "kv_cache_memory_gb": 0.02}
CONFIG = EvalConfig(windows=2, seqlen=48, chunk_size=20, top_k=32, chat_prompts=2, max_tokens=4)


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m", **ENGINE)


@pytest.fixture(scope="module")
def inputs(llm):
    return eval_inputs(llm.get_tokenizer(), CONFIG)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    return load_or_compute_reference("smollm2-135m", inputs, CONFIG, tmp_path_factory.mktemp("ref"), **ENGINE)


def test_perplexity_matches_transformers(llm, inputs):
    from transformers import AutoModelForCausalLM
    ours = evaluate(llm, inputs, CONFIG, None)
    hf = AutoModelForCausalLM.from_pretrained(str(llm.llm_engine.source.path), dtype=torch.float32).eval()
    with torch.no_grad():  # equal-length windows: the mean of per-window mean NLLs is the mean over all tokens
        nll = torch.stack([hf(input_ids=w[None], labels=w[None]).loss for w in inputs.windows]).mean()
    assert ours["tokens_scored"] == 2 * 47
    assert ours["perplexity"] == pytest.approx(nll.exp().item(), rel=1e-4)


def test_model_against_itself(llm, inputs, reference, tmp_path_factory, monkeypatch):
    result = evaluate(llm, inputs, CONFIG, reference)
    assert abs(result["kl_mean"]) < 1e-6 and abs(result["kl_p99"]) < 1e-5
    assert result["top1_agreement"] == 1.0
    assert result["greedy_exact_match"] == 1.0 and result["greedy_prefix_match"] == 1.0
    assert result["perplexity"] == pytest.approx(reference.perplexity, rel=1e-6)
    # The reference is cached on disk: a second request loads it instead of recomputing.
    monkeypatch.setattr(harness_eval, "compute_reference", lambda *a: pytest.fail("recomputed a cached reference"))
    root = next(p for p in tmp_path_factory.getbasetemp().iterdir() if p.name.startswith("ref"))
    again = load_or_compute_reference("smollm2-135m", inputs, CONFIG, root, **ENGINE)
    assert torch.equal(again.top_ids, reference.top_ids) and again.greedy == reference.greedy


def test_fp8_kv_cache_changes_the_numbers(llm, inputs, reference):
    fp8 = LLM("smollm2-135m", kv_cache_dtype="fp8_e5m2", calculate_kv_scales=True, **ENGINE)
    result = evaluate(fp8, inputs, CONFIG, reference)
    assert result["kl_mean"] > 1e-4
    assert result["perplexity"] != pytest.approx(reference.perplexity, rel=1e-6)
    assert result["kv_capacity_tokens"] > 1.9 * llm.llm_engine.kv_capacity_tokens


def test_kl_top_k_exact_at_full_vocab_and_a_lower_bound_below():
    gen = torch.Generator().manual_seed(0)
    p = torch.log_softmax(3 * torch.randn(64, 100, generator=gen), -1)
    q = torch.log_softmax(3 * torch.randn(64, 100, generator=gen), -1)
    exact = (p.exp() * (p - q)).sum(-1)
    full = p.topk(100, dim=-1)
    assert torch.allclose(kl_top_k(full.values, full.indices, q), exact, atol=1e-5)
    top = p.topk(8, dim=-1)
    bound = kl_top_k(top.values, top.indices, q)
    assert (bound <= exact + 1e-5).all() and (bound >= -1e-6).all() and bound.mean() > 0.3 * exact.mean()


def test_text_file_windows(llm, tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(20)))
    config = EvalConfig(windows=100, seqlen=32, chat_prompts=0, text_file=str(text))
    windows = eval_inputs(llm.get_tokenizer(), config).windows
    assert windows.shape[1] == 32 and 3 <= windows.shape[0] < 100  # as many whole windows as the file holds
    text.write_text("too short")
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_inputs(llm.get_tokenizer(), config)


@pytest.mark.parametrize("bad", [{"windows": 0}, {"seqlen": 1}, {"chat_prompts": -1}, {"top_k": "8"}])
def test_eval_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EvalConfig(**bad)
