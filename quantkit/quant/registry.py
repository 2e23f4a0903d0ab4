"""Quantization method names -> QuantConfig classes (imported on first use), and the rule that picks one."""
from __future__ import annotations

import importlib
from typing import Any

from quantkit.quant.base import QuantConfig

# name -> "module:Class". Several names may share a class (aliases).
QUANT_METHODS: dict[str, str] = {
    "gptq": "quantkit.quant.gptq:GPTQConfig",
    "rtn": "quantkit.quant.gptq:RTNConfig",
    "awq": "quantkit.quant.awq:AWQConfig",
    "int8": "quantkit.quant.int8:Int8Config",
    "fp8": "quantkit.quant.fp8:Fp8Config",
    "compressed-tensors": "quantkit.quant.compressed_tensors:CompressedTensorsConfig",
    "nf4": "quantkit.quant.nf4:BitsAndBytesConfig",
    "fp4": "quantkit.quant.nf4:BitsAndBytesConfig",
    "bitsandbytes": "quantkit.quant.nf4:BitsAndBytesConfig",
}


def quant_config_class(name: str) -> type[QuantConfig]:
    if name not in QUANT_METHODS:
        raise ValueError(f"quantization method {name!r} is not supported (available: {', '.join(QUANT_METHODS)})")
    module, _, cls = QUANT_METHODS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


# Dummy (random) weights have nothing to calibrate: the calibrated W4A16 methods become round-to-nearest in their
# kernel format (AWQ: asymmetric; GPTQ: symmetric, desc_act giving the act-order layout), so `llama3-8b` dummy runs
# the same kernels an AWQ or GPTQ checkpoint would, quantized on the device at load.
DUMMY_CALIBRATED = {"awq": {"sym": False}, "gptq": {"sym": True}}


def get_quant_config(quantization: str | None, checkpoint_config: dict[str, Any] | None,
                     overrides: dict[str, Any] | None = None, dummy: bool = False) -> QuantConfig | None:
    """The checkpoint's own `quantization_config` wins; a `quantization=` argument that contradicts it is an
    error that names both. `overrides` tune on-the-fly quantization (e.g. {'bits': 4, 'group_size': 64})."""
    on_disk = (checkpoint_config or {}).get("quant_method")
    if quantization is not None and on_disk is not None and \
            QUANT_METHODS.get(quantization) != QUANT_METHODS.get(on_disk):
        raise ValueError(f"quantization={quantization!r} contradicts the checkpoint, which is quantized with "
                         f"{on_disk!r}; drop the argument or pass quantization={on_disk!r}")
    if overrides and (on_disk is not None or quantization is None):
        raise ValueError("quantization_config only tunes on-the-fly quantization: pass quantization=METHOD "
                         "with an unquantized checkpoint" + (f" (this one is already {on_disk!r})" if on_disk else ""))
    if on_disk is not None:
        return quant_config_class(on_disk).from_config(checkpoint_config, on_the_fly=False)
    if dummy and quantization in DUMMY_CALIBRATED:
        return quant_config_class("rtn").from_config({**DUMMY_CALIBRATED[quantization], **(overrides or {})},
                                                     on_the_fly=True)
    if quantization is not None:
        return quant_config_class(quantization).from_config({**(overrides or {}), "quant_method": quantization},
                                                            on_the_fly=True)
    return None
