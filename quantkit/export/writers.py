"""Writing a quantized Hugging Face directory: model.safetensors, config.json with the producer's
`quantization_config`, side-car JSON (GPTQ's quantize_config.json) and the source's tokenizer files, all
staged in a temporary directory beside the target and moved into place with one os.replace, so a reader never
sees a half-written checkpoint."""
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


def write_checkpoint(src_dir: Path | str, out_dir: Path | str, tensors: dict[str, torch.Tensor],
                     quantization_config: dict[str, Any], extra_json: dict[str, dict] | None = None,
                     overwrite: bool = False) -> Path:
    """Writes `tensors` (full checkpoint names) and src_dir's config.json with `quantization_config` into
    out_dir, atomically. extra_json: file name -> content (e.g. GPTQ's quantize_config.json)."""
    src, out = Path(src_dir), Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config = json.loads((src / "config.json").read_text())
        config.pop("compression_config", None)
        config["quantization_config"] = quantization_config
        (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, content in (extra_json or {}).items():
            (stage / name).write_text(json.dumps(content, indent=2) + "\n")
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, stage / name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(stage / "model.safetensors"),
                  metadata={"format": "pt"})
        _replace_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


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
