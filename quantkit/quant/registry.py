"""Quantization method names -> QuantConfig classes, and the rule that picks one for a model."""
from __future__ import annotations

from typing import Any

from quantkit.quant.base import QuantConfig

QUANT_CONFIGS: dict[str, type[QuantConfig]] = {}


def get_quant_config(quantization: str | None, checkpoint_config: dict[str, Any] | None) -> QuantConfig | None:
    """The checkpoint's own `quantization_config` wins; a `quantization=` argument that contradicts it is an
    error that names both."""
    on_disk = (checkpoint_config or {}).get("quant_method")
    if quantization is not None and on_disk is not None and quantization != on_disk:
        raise ValueError(f"quantization={quantization!r} contradicts the checkpoint, which is quantized with "
                         f"{on_disk!r}; drop the argument or pass quantization={on_disk!r}")
    name = on_disk or quantization
    if name is None:
        return None
    if name not in QUANT_CONFIGS:
        available = ", ".join(sorted(QUANT_CONFIGS)) or "none yet"
        raise ValueError(f"quantization method {name!r} is not supported (available: {available})")
    return QUANT_CONFIGS[name].from_config(checkpoint_config or {"quant_method": name})
