"""Writing a quantized Hugging Face directory: model.safetensors (or shards + index), config.json with the
producer's `quantization_config`, side-car JSON (GPTQ's quantize_config.json) and the source's tokenizer files,
all staged in a temporary directory beside the target and moved into place with one os.replace, so a reader
never sees a half-written checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# Copied verbatim from the source model when present (tokenizer, chat template, generation defaults).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
              "generation_config.json")
CT_FALLBACK_VERSION = "0.20.0"  # the compressed-tensors release these configs follow


DEFAULT_SHARD_BYTES = 2 * 1024 ** 3


class CheckpointWriter:
    """Streams tensors into a staged directory, flushing a safetensors shard whenever `max_shard_bytes` are
    buffered (so a layer-by-layer producer never holds the whole output), then `finish` writes config.json
    (+ the shard index when there is more than one shard), side-car JSON and the source's tokenizer files and
    moves the stage into place with one os.replace. Any exception inside the `with` removes the stage."""

    def __init__(self, src_dir: Path | str, out_dir: Path | str, overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.src, self.out = Path(src_dir), Path(out_dir)
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} exists (pass overwrite=True / --overwrite to replace it)")
        self.max_shard_bytes = max_shard_bytes
        self.stage: Path | None = None
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._shards: list[dict[str, str]] = []  # per flushed file: tensor name -> staged file name
        self.total_bytes = 0

    def __enter__(self) -> CheckpointWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if name in self._buffer or any(name in shard for shard in self._shards):
                raise ValueError(f"tensor {name!r} written twice")
            self._buffer[name] = tensor.contiguous()
            self._buffered += tensor.numel() * tensor.element_size()
        if self._buffered >= self.max_shard_bytes:
            self._flush()

    @property
    def bytes_written(self) -> int:
        """Tensor bytes handed to the writer so far (flushed or buffered)."""
        return self.total_bytes + self._buffered

    def _flush(self) -> None:
        if not self._buffer:
            return
        name = f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._buffer, str(self.stage / name), metadata={"format": "pt"})
        self._shards.append(dict.fromkeys(self._buffer, name))
        self.total_bytes += self._buffered
        self._buffer, self._buffered = {}, 0

    def finish(self, quantization_config: dict[str, Any], extra_json: dict[str, dict] | None = None) -> Path:
        self._flush()
        if not self._shards:
            raise ValueError("no tensors to write")
        self._name_shards()
        config = json.loads((self.src / "config.json").read_text())
        config.pop("compression_config", None)
        config["quantization_config"] = quantization_config
        (self.stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, content in (extra_json or {}).items():
            (self.stage / name).write_text(json.dumps(content, indent=2) + "\n")
        for name in SIDE_FILES:
            if (self.src / name).is_file():
                shutil.copy2(self.src / name, self.stage / name)
        _replace_dir(self.stage, self.out)
        return self.out

    def _name_shards(self) -> None:
        """One file -> model.safetensors; several -> model-0000i-of-0000n.safetensors + the HF index."""
        count = len(self._shards)
        if count == 1:
            os.replace(self.stage / "shard-00000.safetensors", self.stage / "model.safetensors")
            return
        weight_map = {}
        for i, shard in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.stage / f"shard-{i:05d}.safetensors", self.stage / final)
            weight_map.update(dict.fromkeys(shard, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.stage / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_checkpoint(src_dir: Path | str, out_dir: Path | str, tensors: dict[str, torch.Tensor],
                     quantization_config: dict[str, Any], extra_json: dict[str, dict] | None = None,
                     overwrite: bool = False) -> Path:
    """Writes `tensors` (full checkpoint names) and src_dir's config.json with `quantization_config` into
    out_dir, atomically. extra_json: file name -> content (e.g. GPTQ's quantize_config.json)."""
    with CheckpointWriter(src_dir, out_dir, overwrite) as writer:
        writer.add(tensors)
        return writer.finish(quantization_config, extra_json)


def _replace_dir(stage: Path, out: Path) -> None:
    """os.replace cannot replace a non-empty directory: move the old one aside first, drop it after."""
    if not out.exists():
        os.replace(stage, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.replace(out, trash / out.name)
    os.replace(stage, out)
    shutil.rmtree(trash, ignore_errors=True)


def compressed_tensors_config(fmt: str, weights: dict[str, Any],
                              input_activations: dict[str, Any] | None = None) -> dict[str, Any]:
    """One config group over every Linear, lm_head ignored, as llm-compressor's ModelCompressor.update_config
    writes it (QuantizationArgs with their defaults spelled out)."""
    def args(d: dict[str, Any]) -> dict[str, Any]:
        return {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": None,
                "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
                "observer_kwargs": {}, **d}
    try:
        version = metadata.version("compressed-tensors")
    except metadata.PackageNotFoundError:
        version = CT_FALLBACK_VERSION
    group = {"targets": ["Linear"], "weights": args(weights),
             "input_activations": args(input_activations) if input_activations else None,
             "output_activations": None, "format": fmt}
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": group},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "quantization_status": "compressed",
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}, "version": version}
