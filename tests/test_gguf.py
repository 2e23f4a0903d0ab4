"""GGUF import: our converted tensors against the `gguf` package's dequantizer, an independent block decoder
written from FORMATS.md §7, and transformers' own GGUF loader; atomic conversion; clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

import quantkit.checkpoint.gguf as qgguf
from quantkit.checkpoint.gguf import convert_gguf, hf_tensor_name, unpermute_rotary
from quantkit.checkpoint.resolve import converted_dir, embedded_gguf_path, resolve_model

PERMUTED = ("attn_q.weight", "attn_k.weight")


@pytest.fixture(scope="module")
def reader():
    # Parsing the tokenizer fields takes seconds: one reader for the module, shared read-only.
    return gguf.GGUFReader(str(embedded_gguf_path()))


@pytest.fixture(scope="module")
def converted(embedded_source):
    with safe_open(str(embedded_source.path / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def reference(tensor) -> np.ndarray:
    """gguf's own dequantizer, in PyTorch order ([N, K])."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape([int(d) for d in reversed(tensor.shape)])


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, written out independently of our inverse."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def test_converted_tensors_equal_gguf_dequantizer(reader, converted, embedded_source):
    cfg = embedded_source.hf_config
    assert {t.tensor_type.name for t in reader.tensors} >= {"Q4_1", "Q8_0", "F32"}  # every dispatch path runs
    assert len(converted) == len(reader.tensors)
    permuted = 0
    for t in reader.tensors:
        ours = converted[hf_tensor_name(t.name)]
        assert ours.dtype == torch.float16, t.name
        ref = reference(t)
        if t.name.endswith(PERMUTED):
            heads = cfg["num_attention_heads"] if "attn_q" in t.name else cfg["num_key_value_heads"]
            # Ours is the HF layout: permuting it the way llama.cpp does must give back the file's rows.
            np.testing.assert_array_equal(llama_cpp_permute(ours.numpy(), heads), ref.astype(np.float16),
                                          err_msg=t.name)
            np.testing.assert_array_equal(ours.numpy(), unpermute_rotary(ref, heads).astype(np.float16))
            assert not np.array_equal(ours.numpy(), ref.astype(np.float16))  # the permutation is not a no-op
            permuted += 1
        else:
            np.testing.assert_array_equal(ours.numpy(), ref.astype(np.float16), err_msg=t.name)
    assert permuted == 2 * cfg["num_hidden_layers"]


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)  # 3 heads of dim 8
    np.testing.assert_array_equal(unpermute_rotary(llama_cpp_permute(w, 3), 3), w)
    # Within a head, HF row i (first half) and i + dim/2 (second half) are llama.cpp rows 2i and 2i+1.
    np.testing.assert_array_equal(llama_cpp_permute(w, 3)[[0, 1]], w[[0, 4]])


# --- an independent block decoder, from FORMATS.md §7 -------------------------------------------------------------

def decode_q4_1(raw: np.ndarray, rows: int) -> np.ndarray:
    """Blocks of 20 bytes: d fp16, m fp16, qs[16]; element j = low nibble of qs[j], j+16 = high nibble."""
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return (q * d + m).reshape(rows, -1)


def decode_q8_0(raw: np.ndarray, rows: int) -> np.ndarray:
    """Blocks of 34 bytes: d fp16, qs int8[32]; x = q * d."""
    blocks = raw.reshape(-1, 34)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:34].copy().view(np.int8).astype(np.float32)
    return (q * d).reshape(rows, -1)


@pytest.mark.parametrize("name,kind,decoder", [("blk.0.attn_v.weight", "Q4_1", decode_q4_1),
                                               ("blk.3.ffn_down.weight", "Q4_1", decode_q4_1),
                                               ("token_embd.weight", "Q8_0", decode_q8_0)])
def test_independent_block_decoder(reader, converted, name, kind, decoder):
    t = next(t for t in reader.tensors if t.name == name)
    assert t.tensor_type.name == kind
    rows, cols = min(int(t.shape[1]), 4096), int(t.shape[0])  # the first 4096 rows are plenty
    raw = np.asarray(t.data[:rows])
    ours = decoder(raw, rows)
    assert ours.shape == (rows, cols)
    ref = gguf.quants.dequantize(raw, t.tensor_type).reshape(rows, cols)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(converted[hf_tensor_name(name)][:rows].numpy(), ours.astype(np.float16))


def test_matches_transformers_gguf_loader(embedded_source, converted, reader, monkeypatch):
    """transformers' loader does its own dequantize and Q/K un-permutation: an independent cross-check."""
    import functools

    from transformers import AutoModelForCausalLM
    path = embedded_gguf_path()
    # Speed only: transformers parses the file twice and rebuilds gguf's name map once per module (~15 s);
    # hand it gguf's own reader, already parsed, and memoize the (pure) name-map builder.
    monkeypatch.setattr(gguf, "GGUFReader", lambda p: reader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    state = ref.state_dict()
    for name, ours in converted.items():
        torch.testing.assert_close(ours, state[name].half(), rtol=0, atol=0, msg=name)
    assert embedded_source.hf_config["tie_word_embeddings"] and "lm_head.weight" not in converted
    torch.testing.assert_close(converted["model.embed_tokens.weight"], state["lm_head.weight"].half(), rtol=0, atol=0)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps", "tie_word_embeddings"):
        assert embedded_source.hf_config[key] == getattr(ref.config, key), key
    assert embedded_source.hf_config["rope_theta"] == ref.config.rope_parameters["rope_theta"]


# --- conversion: atomic, once, clear errors -----------------------------------------------------------------------

@pytest.fixture
def fast_convert(monkeypatch, reader):
    """convert_gguf of a cut-down view of the file: the shared reader's metadata, only its first 24 tensors (the
    embedding, norms, Q4_1 and permuted Q/K layers all among them), and a stub tokenizer; well under a second."""
    class Subset:
        fields = reader.fields
        tensors = reader.tensors[:24]
    assert {t.tensor_type.name for t in Subset.tensors} == {"Q8_0", "Q4_1", "F32"}
    monkeypatch.setattr(gguf, "GGUFReader", lambda path: Subset)

    class StubTokenizer:
        def save_pretrained(self, path):
            (Path(path) / "tokenizer.json").write_text("{}")

    import transformers
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, *a, **k: StubTokenizer()))


def _boom(*args, **kwargs):
    raise RuntimeError("injected failure")


@pytest.mark.parametrize("failure", ["dequantize", "save_file", "replace"])
def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch, fast_convert, failure):
    out = tmp_path / "converted"
    if failure == "dequantize":
        real, calls = qgguf.dequantize_tensor, []

        def flaky(t):
            calls.append(t.name)
            if len(calls) == 5:  # midway: some tensors already converted
                raise RuntimeError("injected failure")
            return real(t)
        monkeypatch.setattr(qgguf, "dequantize_tensor", flaky)
    elif failure == "save_file":
        monkeypatch.setattr(qgguf, "save_file", _boom)
    else:
        def no_space(src, dst):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(qgguf.os, "replace", no_space)
    with pytest.raises((RuntimeError, OSError)):
        convert_gguf(embedded_gguf_path(), out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no leftover temp directory either


def test_conversion_writes_complete_directory(tmp_path, fast_convert):
    out = convert_gguf(embedded_gguf_path(), tmp_path / "converted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_second_resolve_does_not_reconvert(embedded_source, monkeypatch):
    weights = embedded_source.path / "model.safetensors"
    before = (embedded_source.path.stat().st_mtime_ns, weights.stat().st_mtime_ns)
    monkeypatch.setattr(qgguf, "dequantize_tensor", _boom)  # any reconversion would fail loudly
    again = resolve_model("smollm2-135m")
    assert again.path == embedded_source.path == converted_dir(embedded_gguf_path())
    assert (again.path.stat().st_mtime_ns, weights.stat().st_mtime_ns) == before
    assert again.hf_config == embedded_source.hf_config


def _write_gguf(path, arch: str) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_gguf_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-gpt2.gguf"
    _write_gguf(path, "gpt2")
    with pytest.raises(ValueError, match=r"GGUF architecture 'gpt2' is not supported"):
        resolve_model(str(path))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


def test_not_a_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="broken.gguf"):
        resolve_model(str(path))


def test_unknown_gguf_tensor_name():
    with pytest.raises(ValueError, match="blk.0.attn_weird.weight"):
        hf_tensor_name("blk.0.attn_weird.weight")
    assert hf_tensor_name("blk.12.ffn_gate.weight") == "model.layers.12.mlp.gate_proj.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
