"""GGUF (llama.cpp) -> Hugging Face directory. Each tensor is dequantized by the `gguf` package according to its
own type (Q4_1 decoder weights, Q8_0 embedding, F32 norms, ...), llama.cpp's rotary row permutation of the Q and
K projections is undone, and the result is written atomically: a crash leaves no half-written model."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from quantkit.checkpoint.hf import CheckpointError

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_tensor_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    raise CheckpointError(f"unknown GGUF tensor {gguf_name!r}")


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert-time permutation: per head, rows interleaved as (dim/2, 2) -> (2, dim/2)."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def dequantize_tensor(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in PyTorch order ([N, K] for a weight whose GGUF dims are [K, N])."""
    from gguf.quants import dequantize
    values = dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape([int(d) for d in reversed(tensor.shape)])


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    p = lambda key, default=None: _field(reader, f"llama.{key}", default)  # noqa: E731
    heads = int(p("attention.head_count"))
    hidden = int(p("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = p("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(vocab), "hidden_size": hidden,
        "intermediate_size": int(p("feed_forward_length")), "num_hidden_layers": int(p("block_count")),
        "num_attention_heads": heads, "num_key_value_heads": int(p("attention.head_count_kv", heads)),
        "head_dim": int(p("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(p("attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(p("context_length", 4096)),
        "rope_theta": float(p("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float16",
    }


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Writes config.json, tokenizer files and model.safetensors for `gguf_path` into `out_dir` atomically."""
    import gguf
    from transformers import AutoTokenizer

    if out_dir.exists():
        return out_dir
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{gguf_path}: not a readable GGUF file ({e})") from e
    config = gguf_config(reader)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tensors = {}
        for t in tqdm(reader.tensors, desc=f"Converting {gguf_path.name}", unit="tensor"):
            values = dequantize_tensor(t)
            if t.name.startswith("blk.") and t.name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = config["num_attention_heads"] if "attn_q" in t.name else config["num_key_value_heads"]
                values = unpermute_rotary(values, heads)
            tensors[hf_tensor_name(t.name)] = torch.tensor(values, dtype=dtype)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, out_dir)  # atomic; if another process won the race, keep theirs
    except OSError:
        if not out_dir.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
