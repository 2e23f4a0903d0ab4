"""Streams checkpoint tensors into a model's parameters: map each name to (parameter, shard), copy, and check
that every expected load happened exactly once. Never a silent partial load."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from quantkit.checkpoint.hf import CheckpointError
from quantkit.layers.linear import Linear, copy_checked
from quantkit.quant.kv_cache import kv_scale_target, scale_value


def _owner(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = param_name.rpartition(".")
    return model.get_submodule(module_name) if module_name else model, attr


def map_name(model: nn.Module, name: str) -> tuple[str, int | None] | None:
    """Checkpoint tensor name -> (our parameter name, shard) or None when the tensor is to be skipped."""
    if name.endswith(model.ignored_suffixes):
        return None
    if name.startswith("lm_head.") and model.config.tie_word_embeddings:
        return None  # tied heads reuse the embedding; some checkpoints store a copy anyway
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in model.packed_modules:
            merged, shard = model.packed_modules[part]
            return ".".join(parts[:i] + [merged] + parts[i + 1:]), shard
    return name, None


def checkpoint_name(model: nn.Module, param_name: str, shard: int | None) -> str:
    """Inverse of map_name for messages: ('...qkv_proj.weight', 1) -> '...k_proj.weight'."""
    if shard is None:
        return param_name
    parts = param_name.split(".")
    for ckpt_module, (merged, index) in model.packed_modules.items():
        if index == shard and merged in parts[:-1]:
            i = parts.index(merged)
            return ".".join(parts[:i] + [ckpt_module] + parts[i + 1:])
    return f"{param_name}[shard {shard}]"


def expected_loads(model: nn.Module, prefix: str = "") -> set[tuple[str, int | None]]:
    params = dict(model.named_parameters(remove_duplicate=True))
    expected = set()
    for name, param in params.items():
        if prefix and not name.startswith(prefix + "."):
            continue
        owner, _ = _owner(model, name)
        shards = owner.shard_ids(param) if isinstance(owner, Linear) else [None]
        expected.update((name, s) for s in shards)
    return expected


def _find_param(params: dict[str, nn.Parameter], mapped: str) -> str | None:
    """Quantized formats nest names below the weight ('q_proj.weight.absmax'); such a tensor lives in the
    parameter named by joining the tail with '_' ('weight_absmax')."""
    parts = mapped.split(".")
    for tail in range(1, len(parts)):
        candidate = ".".join(parts[:-tail]) + "." + "_".join(parts[-tail:])
        if candidate in params:
            return candidate
    return None


def load_weights(model: nn.Module, tensors: Iterable[tuple[Path, str, torch.Tensor]], source: str,
                 prefix: str = "") -> set[str]:
    """Copies every tensor into its parameter; raises CheckpointError naming file and tensor on any mismatch.
    Returns the attention modules whose KV-cache scales the checkpoint carried. prefix: load (and require) only
    the parameters under this module (the layer-by-layer quantizer materializes one layer at a time)."""
    params = dict(model.named_parameters(remove_duplicate=True))
    expected = expected_loads(model, prefix)
    loaded: set[tuple[str, int | None]] = set()
    kv_scaled: set[str] = set()
    for path, name, tensor in tensors:
        kv_target = kv_scale_target(name)
        if kv_target is not None:
            _load_kv_scale(model, kv_target, tensor, f"{path}: tensor {name!r}")
            kv_scaled.add(kv_target[0])
            continue
        mapped = map_name(model, name)
        if mapped is None:
            continue
        param_name, shard = _find_param(params, mapped[0]), mapped[1]
        if param_name is None:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} (no parameter {mapped[0]!r} in the model)")
        if (param_name, shard) in loaded:
            raise CheckpointError(f"{path}: tensor {name!r} appears twice")
        owner, _ = _owner(model, param_name)
        try:
            if isinstance(owner, Linear):
                owner.load_weight(params[param_name], tensor, shard)
            else:
                copy_checked(params[param_name].data, tensor)
        except ValueError as e:
            raise CheckpointError(f"{path}: tensor {name!r}: {e}") from e
        loaded.add((param_name, shard))
    missing = sorted(checkpoint_name(model, n, s) for n, s in expected - loaded)
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise CheckpointError(f"{source}: missing tensors for {missing[:8]}{more}")
    return kv_scaled


def _load_kv_scale(model: nn.Module, target: tuple[str, str], tensor: torch.Tensor, where: str) -> None:
    module_name, which = target
    try:
        attn = model.get_submodule(module_name)
    except AttributeError as e:
        raise CheckpointError(f"{where}: no attention layer {module_name!r} for this KV scale") from e
    try:
        value = scale_value(tensor, where)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    for kind in ("k", "v") if which == "kv" else (which,):
        getattr(attn, f"{kind}_scale").copy_(value)
