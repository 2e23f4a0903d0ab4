"""Shared fixtures: the embedded SmolLM2 source (converted once into a stable cache), small random transformers
models saved to disk, and helpers that run our model and a transformers model on the same token sequences."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# A stable cache for the whole session (and across sessions): the ~2 s GGUF conversion runs once. Set before any
# quantkit import reads it; an explicit QUANTKIT_CACHE from the caller wins.
os.environ.setdefault("QUANTKIT_CACHE", str(Path.home() / ".cache" / "quantkit"))

from quantkit.checkpoint.resolve import resolve_model  # noqa: E402
from quantkit.layers.attention import AttentionMetadata  # noqa: E402
from quantkit.models.loader import build_model  # noqa: E402

CPU = torch.device("cpu")

# Small shapes shared by the transformers comparisons: GQA (4 heads over 2 KV heads), 2 layers.
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped on a machine without CUDA (CI is CPU-only)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_source():
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def embedded_model(embedded_source):
    return build_model(embedded_source, torch.float32, CPU)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, std: float = 0.15) -> None:
    """Every parameter random, biases and norms included (transformers inits biases to 0 and norms to 1, which
    would let a bias or norm that never loads pass). Norms stay near 1 so activations keep their scale."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif name.endswith("bias"):
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        elif "embed" in name:
            p.copy_(torch.randn(p.shape, generator=gen))
        else:
            p.copy_(std * torch.randn(p.shape, generator=gen))


def make_hf_model(path: Path, family: str = "llama", seed: int = 0, std: float = 0.15, **overrides):
    """Builds a seeded random transformers model of `family` ('llama' | 'mistral' | 'qwen2'), saves it as
    safetensors into `path` and returns it (eval mode, float32, eager attention)."""
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
    cfg_name, model_name = classes[family]
    config = getattr(transformers, cfg_name)(**{**SMALL, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float().eval()
    randomize_(model, seed, std)
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(str(path), safe_serialization=True)
    return model


@pytest.fixture
def hf_model_factory(tmp_path):
    """make_hf_model into a fresh subdirectory of the test's tmp_path; returns (transformers model, dir)."""
    counter = iter(range(1000))

    def factory(family: str = "llama", seed: int = 0, std: float = 0.15, **overrides):
        path = tmp_path / f"{family}-{next(counter)}"
        return make_hf_model(path, family, seed, std, **overrides), path
    return factory


@pytest.fixture(scope="session")
def small_llama_dir(tmp_path_factory):
    """One small saved Llama (GQA, untied) shared read-only by tests that copy or break it."""
    path = tmp_path_factory.mktemp("small_llama")
    make_hf_model(path, "llama", seed=1)
    return path


def random_seqs(lengths: list[int], vocab: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


@torch.no_grad()
def ours_logits(model, seqs: list[torch.Tensor]) -> torch.Tensor:
    """Our logits for every token of every sequence, run as one flattened no-cache prefill batch."""
    ids = torch.cat(seqs)
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    hidden = model(ids, positions, AttentionMetadata.for_prefill([len(s) for s in seqs]))
    return model.compute_logits(hidden)


@torch.no_grad()
def hf_logits(model, seqs: list[torch.Tensor]) -> torch.Tensor:
    """transformers' logits, one unpadded sequence at a time, concatenated like ours_logits."""
    return torch.cat([model(input_ids=s[None]).logits[0].float() for s in seqs])


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref|."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="session")
def helpers():
    """The module-level helpers, for test files (pytest discourages importing conftest directly)."""
    fns = (random_seqs, ours_logits, hf_logits, max_rel_err, randomize_, make_hf_model)
    return SimpleNamespace(SMALL=SMALL, **{fn.__name__: fn for fn in fns})
