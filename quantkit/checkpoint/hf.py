"""Hugging Face safetensors checkpoints, single-file or sharded, read one tensor at a time."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and tensor."""


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, checked against the shard index when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid shard index ({e})") from e
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shard files that do not exist: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors files (quantkit reads safetensors checkpoints)")
    return files


def iterate_tensors(model_dir: Path, select: Callable[[str], bool] | None = None
                    ) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """Yields (file, name, tensor) lazily: one tensor lives in memory at a time. select(name): read only those."""
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if select is None or select(name):
                        yield path, name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({e})") from e


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def read_config(model_dir: Path) -> dict:
    """config.json, with the quantization settings AutoGPTQ/AutoAWQ keep beside it folded in (as their loaders
    read them: config.json's `quantization_config`, else quantize_config.json, else quant_config.json)."""
    path = model_dir / "config.json"
    if not path.exists():
        raise CheckpointError(f"{model_dir}: no config.json")
    config = _read_json(path)
    if config.get("quantization_config") is None and config.get("compression_config") is not None:
        config["quantization_config"] = config["compression_config"]  # legacy compressed-tensors key
    if config.get("quantization_config") is None:
        for name in ("quantize_config.json", "quant_config.json"):
            if (model_dir / name).exists():
                quant = _read_json(model_dir / name)
                is_awq = "w_bit" in quant or str(quant.get("version", "")).lower().startswith("gem")
                quant.setdefault("quant_method", "awq" if is_awq else "gptq")
                config["quantization_config"] = quant
                break
    return config
