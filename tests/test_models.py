"""Our decoder against transformers, float32: small random models of every supported family and feature, saved
as safetensors and loaded through resolve_model + build_model, plus the embedded SmolLM2 on real text."""
from __future__ import annotations

import copy

import pytest
import torch

from quantkit.checkpoint.resolve import ModelSource, resolve_model
from quantkit.config import ModelConfig, RopeConfig
from quantkit.layers.rotary import rope_inv_freq
from quantkit.models.loader import build_model

CPU = torch.device("cpu")
TOL = 1e-4
LENGTHS = [37, 23]  # two different-length sequences in one flattened batch

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0}

# (family, config overrides, a config.json change that switches the feature off: the logits must then move, so
# the comparison is known to exercise the feature; None where there is no such switch)
CASES = {
    "llama": ("llama", {}, None),
    "llama-hidden96-3heads-mqa": ("llama", dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1), None),
    "llama-head_dim-32": ("llama", dict(head_dim=32), None),  # heads*head_dim (128) != hidden (64)
    "llama-llama3-rope": ("llama", dict(rope_parameters=LLAMA3_ROPE),
                          {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "llama-linear-rope": ("llama", dict(rope_parameters=LINEAR_ROPE),
                          {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "llama-tied": ("llama", dict(tie_word_embeddings=True), None),
    "llama-attention-bias": ("llama", dict(attention_bias=True, mlp_bias=True), None),
    "mistral-sliding8": ("mistral", dict(sliding_window=8, head_dim=16),
                         {"sliding_window": None, "layer_types": None}),
    "qwen2": ("qwen2", {}, None),
    "qwen2-sliding-upper-layers": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
                                   {"layer_types": None, "use_sliding_window": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, hf_model_factory, helpers):
    family, overrides, feature_off = CASES[case]
    hf, path = hf_model_factory(family, seed=len(case), **overrides)
    source = resolve_model(str(path))
    model = build_model(source, torch.float32, CPU)
    seqs = helpers.random_seqs(LENGTHS, hf.config.vocab_size, seed=3)
    ref = helpers.hf_logits(hf, seqs)
    ours = helpers.ours_logits(model, seqs)
    assert torch.isfinite(ours).all()
    err = helpers.max_rel_err(ours, ref)
    assert err <= TOL, f"{case}: max relative error {err:.2e}"
    if feature_off is not None:
        off = ModelSource(source.name, source.path, {**source.hf_config, **feature_off})
        moved = helpers.max_rel_err(helpers.ours_logits(build_model(off, torch.float32, CPU), seqs), ref)
        assert moved > 100 * TOL, f"{case}: switching the feature off changed nothing ({moved:.2e})"


def test_family_specific_layout(hf_model_factory):
    """Qwen2 has q/k/v bias but no o_proj bias; Llama attention_bias puts a bias on o_proj too; tied heads share
    the embedding tensor; the Mistral window reaches every layer and Qwen2's only the layers past
    max_window_layers."""
    _, qwen = hf_model_factory("qwen2")
    m = build_model(resolve_model(str(qwen)), torch.float32, CPU)
    attn = m.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()

    _, llama = hf_model_factory("llama", attention_bias=True, tie_word_embeddings=True)
    m = build_model(resolve_model(str(llama)), torch.float32, CPU)
    attn = m.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is not None
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()

    _, mistral = hf_model_factory("mistral", sliding_window=8)
    cfg = ModelConfig.from_hf(resolve_model(str(mistral)).hf_config)
    assert cfg.sliding_windows == [8, 8]
    _, qwen_sw = hf_model_factory("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert ModelConfig.from_hf(resolve_model(str(qwen_sw)).hf_config).sliding_windows == [None, 8]


def _hf_inv_freq(hf_config: dict) -> torch.Tensor:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = LlamaConfig(**copy.deepcopy(hf_config))
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return 1.0 / (config.rope_parameters["rope_theta"]
                      ** (torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim))
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")[0]


@pytest.mark.parametrize("raw", [
    # transformers 4 style (rope_theta beside rope_scaling) and the older "type" key
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
    # llama3 without original_max_position_embeddings: transformers falls back to max_position_embeddings
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
])
def test_rope_config_parsing_matches_transformers(raw):
    hf_config = {"hidden_size": 256, "num_attention_heads": 2, "max_position_embeddings": 2048, **raw}
    head_dim = 128
    ours = rope_inv_freq(head_dim, RopeConfig.from_hf(hf_config))
    torch.testing.assert_close(ours, _hf_inv_freq(hf_config), rtol=1e-6, atol=0)


def test_embedded_smollm2_matches_transformers(embedded_source, embedded_model, helpers):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(embedded_source.path))
    hf = AutoModelForCausalLM.from_pretrained(str(embedded_source.path), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    sentences = ["The capital of France is Paris, and the capital of Germany is",
                 "def fibonacci(n):\n    return",
                 "Quantization trades a little accuracy for a lot of memory bandwidth, which is what decoding needs."]
    seqs = [torch.tensor(tok(s)["input_ids"]) for s in sentences]
    assert len({len(s) for s in seqs}) == 3
    ref = helpers.hf_logits(hf, seqs)
    ours = helpers.ours_logits(embedded_model, seqs)
    err = helpers.max_rel_err(ours, ref)
    assert err <= TOL, f"max relative error {err:.2e}"
    # The real weights make real predictions: " Berlin" follows the first prompt.
    assert tok.decode(ours[len(seqs[0]) - 1].argmax()).strip() == "Berlin"


def test_bf16_model_keeps_its_dtype_end_to_end():
    """Every parameter (norms included) in the model dtype, so bf16 activations never meet fp32 weights."""
    from quantkit.layers.attention import AttentionMetadata
    model = build_model(resolve_model("smollm2-135m", "dummy"), torch.bfloat16, CPU, dummy=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    hidden = model(torch.arange(12), torch.arange(12), AttentionMetadata.for_prefill([5, 7]))
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(model.compute_logits(hidden)).all()
