"""FP8 KV-cache scales: the many names checkpoints use for them, and the all-or-none rule. Semantics (FORMATS.md
§6): the cache stores fp8(x / scale) and attention reads cache * scale."""
from __future__ import annotations

import re

import torch

_KV_SCALE_PATTERNS = [
    # (regex on the checkpoint name, which scales it sets)
    (re.compile(r"^(.*\.self_attn)\.(k|v)_scale$"), None),                 # vLLM / compressed-tensors
    (re.compile(r"^(.*\.self_attn)\.kv_scale$"), "kv"),                    # legacy: one scale for both
    (re.compile(r"^(.*\.self_attn)\.(k|v)_proj\.output_scale$"), None),    # AutoFP8, old compressed-tensors
    (re.compile(r"^(.*\.self_attn)\.(k|v)_proj\.(?:k|v)_scale$"), None),   # ModelOpt
]


def kv_scale_target(name: str) -> tuple[str, str] | None:
    """'model.layers.3.self_attn.k_scale' -> ('model.layers.3.self_attn.attn', 'k'); 'kv' sets both."""
    for pattern, which in _KV_SCALE_PATTERNS:
        m = pattern.match(name)
        if m:
            return f"{m.group(1)}.attn", which or m.group(2)
    return None


def scale_value(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """A per-tensor scale as a 0-dim fp32 tensor; anything but one positive finite value is an error."""
    if tensor.numel() != 1:
        raise ValueError(f"{name}: KV scale must hold one value (per-tensor), got shape {tuple(tensor.shape)}")
    value = tensor.reshape(()).float()
    if not torch.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: KV scale must be positive and finite, got {value.item()}")
    return value
