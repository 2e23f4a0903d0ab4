"""Fixtures for the weight-only integer formats: a small random Llama written twice, once with its decoder Linears
in a quantized checkpoint format and once with the same weights dequantized to fp32 (the reference)."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.checkpoint.resolve import resolve_model
from quantkit.layers.linear import Linear
from quantkit.models.loader import build_model
from quantkit.quant.base import QuantConfig
from quantkit.quant.registry import get_quant_config

# hidden 256 (4 heads x 64, 2 KV heads -> qkv shards 256/128/128), intermediate 384: divisible by 32/64/128
QUANT_SMALL = {"hidden_size": 256, "intermediate_size": 384, "num_attention_heads": 4, "num_key_value_heads": 2}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# writer(module_name, weight [N, K] fp32) -> (checkpoint tensors by suffix, dequantized weight [N, K] fp32)
Writer = Callable[[str, torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]


def write_pair(base: Path, helpers, writer: Writer, quant_config: dict, seed: int = 0,
               keep: Callable[[str], bool] = lambda name: False) -> tuple[Path, Path]:
    """-> (quantized checkpoint dir, dequantized fp32 reference dir). Modules for which keep(name) stay fp."""
    fp_dir, q_dir, ref_dir = base / "fp", base / "quant", base / "ref"
    helpers.make_hf_model(fp_dir, "llama", seed=seed, **QUANT_SMALL)
    state = load_file(str(fp_dir / "model.safetensors"))
    quant, ref = {}, {}
    for name, tensor in state.items():
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and module.rpartition(".")[2] in LINEARS and \
                module.startswith("model.layers.") and not keep(module):
            tensors, deq = writer(module, tensor)
            quant.update({f"{module}.{k}": v.contiguous() for k, v in tensors.items()})
            ref[name] = deq
        else:
            quant[name] = ref[name] = tensor
    for d, tensors in ((q_dir, quant), (ref_dir, ref)):
        shutil.copytree(fp_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(tensors, str(d / "model.safetensors"))
    cfg = json.loads((q_dir / "config.json").read_text())
    cfg["quantization_config"] = quant_config
    (q_dir / "config.json").write_text(json.dumps(cfg))
    return q_dir, ref_dir


def load_ours(path: Path, quant_config: QuantConfig | None = None):
    """Our fp32 model of a checkpoint dir; quant_config overrides the one config.json names."""
    source = resolve_model(str(path))
    qc = quant_config or get_quant_config(None, source.hf_config.get("quantization_config"))
    return build_model(source, torch.float32, torch.device("cpu"), quant_config=qc)


def quantized_layers(model) -> list[Linear]:
    return [m for m in model.modules() if isinstance(m, Linear) and hasattr(m, "qweight")]


def layer_bytes(layer: Linear) -> int:
    return sum(p.numel() * p.element_size() for n, p in layer.named_parameters() if n != "bias")


def theory_bytes(layer: Linear, bits: int, group_size: int) -> float:
    """Packed codes + one scale (its dtype) and one b-bit zero per group and output."""
    k, n = layer.input_size, layer.output_size
    groups = -(-k // (k if group_size == -1 else group_size))
    return n * k * bits / 8 + groups * n * (layer.scales.element_size() + bits / 8)


def assert_same_model(q_dir: Path, ref_dir: Path, helpers, bits: int, group_size: int,
                      quant_config: QuantConfig | None = None) -> None:
    """Quantized load == dequantized reference (logits and greedy tokens), and resident bytes near theory."""
    ours, ref = load_ours(q_dir, quant_config), load_ours(ref_dir)
    layers = quantized_layers(ours)
    assert len(layers) == 2 * 4, "every decoder Linear (qkv, o, gate_up, down) x 2 layers is quantized"
    for layer in layers:
        assert layer_bytes(layer) == pytest.approx(theory_bytes(layer, bits, group_size), rel=0.05)
    seqs = helpers.random_seqs([7, 12], 256, seed=3)
    got, want = helpers.ours_logits(ours, seqs), helpers.ours_logits(ref, seqs)
    assert helpers.max_rel_err(got, want) < 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.fixture(scope="session")
def qh():
    """This file's helpers, for the test modules (pytest discourages importing conftest directly)."""
    fns = (write_pair, load_ours, quantized_layers, layer_bytes, theory_bytes, assert_same_model)
    return SimpleNamespace(**{fn.__name__: fn for fn in fns})
