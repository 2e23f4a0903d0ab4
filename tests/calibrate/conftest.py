"""A small random Llama with a real tokenizer and activation outliers, shared by the quantize tests."""
from __future__ import annotations

import shutil

import pytest
import torch

SHAPES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, embedded_source, helpers):
    """A small random Llama with the embedded model's tokenizer (so calibration text goes through a real
    tokenizer) whose norms give a few input channels 20x the others: the activation outliers that AWQ and
    SmoothQuant exist for (real LLMs have them; isotropic random weights do not)."""
    path = tmp_path_factory.mktemp("outliers")
    model = helpers.make_hf_model(path, "llama", seed=3, vocab_size=embedded_source.hf_config["vocab_size"],
                                  **SHAPES)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.arange(0, 128, 16)] *= 20
    model.save_pretrained(str(path), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (embedded_source.path / name).exists():
            shutil.copy(embedded_source.path / name, path / name)
    (path / "calib.txt").write_text("\n\n".join(paragraphs(range(0, 60))))
    (path / "heldout.txt").write_text("\n\n".join(paragraphs(range(60, 80))))
    return path


def paragraphs(numbers: range) -> list[str]:
    """Text of one distribution for calibration and held-out evaluation (disjoint numbers)."""
    words = ["red", "quiet", "northern", "wide", "cold", "green", "slow", "bright", "old", "deep", "busy"]
    return [f"Paragraph {i}: the {words[i % 11]} river flows past {i * 7} mills, and the miller counts {i * 13} "
            f"sacks of {words[i * 3 % 11]} grain before the winter market opens on day {i % 29}." for i in numbers]


