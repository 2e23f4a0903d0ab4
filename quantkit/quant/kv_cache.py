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


FP8_MAX = {dtype: torch.finfo(dtype).max for dtype in (torch.float8_e4m3fn, torch.float8_e5m2)}

# A short multi-domain text for calibrating KV scales when the checkpoint has none (`calculate_kv_scales=True`).
CALIBRATION_TEXT = (
    "The mitochondria is the powerhouse of the cell, producing ATP through oxidative phosphorylation. "
    "def quicksort(xs):\n    if len(xs) < 2:\n        return xs\n    pivot = xs[0]\n"
    "In 1492, Columbus sailed across the Atlantic Ocean; the voyage changed European trade for centuries. "
    "User: Can you explain how interest rates affect inflation?\nAssistant: Central banks raise rates to "
    "cool demand, which slows price growth. 東京は日本の首都です。 Prix: 42,50 € — très bien! "
)


@torch.inference_mode()
def calibrate_kv_scales(model: torch.nn.Module, token_ids: list[int], kv_dtype: torch.dtype) -> None:
    """Runs one uncached forward, records each layer's K and V absmax, and sets scale = amax / fp8 max."""
    from quantkit.engine.kv_cache import attention_layers
    from quantkit.layers.attention import AttentionMetadata

    amax: dict[int, list[torch.Tensor]] = {}

    def record(module, args):
        _, k, v, _ = args
        amax[id(module)] = [k.abs().amax().float(), v.abs().amax().float()]

    layers = attention_layers(model)
    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        device = next(model.parameters()).device
        ids = torch.tensor(token_ids, device=device)
        model(ids, torch.arange(len(token_ids), device=device), AttentionMetadata.for_prefill([len(token_ids)], device))
    finally:
        for hook in hooks:
            hook.remove()
    fp8_max = FP8_MAX[kv_dtype]
    for layer in layers:
        k_amax, v_amax = amax[id(layer)]
        layer.k_scale.copy_(torch.clamp(k_amax / fp8_max, min=1e-8))
        layer.v_scale.copy_(torch.clamp(v_amax / fp8_max, min=1e-8))
