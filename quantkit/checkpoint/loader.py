"""Streams checkpoint tensors into a model's parameters: map each name to (parameter, shard), copy, and check
that every expected load happened exactly once. Never a silent partial load."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from quantkit.checkpoint.hf import CheckpointError
from quantkit.layers.linear import Linear, copy_checked


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


def expected_loads(model: nn.Module) -> set[tuple[str, int | None]]:
    params = dict(model.named_parameters(remove_duplicate=True))
    expected = set()
    for name, param in params.items():
        owner, _ = _owner(model, name)
        shards = owner.shard_ids(param) if isinstance(owner, Linear) else [None]
        expected.update((name, s) for s in shards)
    return expected


def load_weights(model: nn.Module, tensors: Iterable[tuple[Path, str, torch.Tensor]], source: str) -> None:
    """Copies every tensor into its parameter; raises CheckpointError naming file and tensor on any mismatch."""
    params = dict(model.named_parameters(remove_duplicate=True))
    expected = expected_loads(model)
    loaded: set[tuple[str, int | None]] = set()
    for path, name, tensor in tensors:
        mapped = map_name(model, name)
        if mapped is None:
            continue
        param_name, shard = mapped
        if param_name not in params:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} (no parameter {param_name!r} in the model)")
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

