"""`quantization="int8"` over an unquantized checkpoint: symmetric per-output-channel INT8 weights (absmax/127)
with dynamic per-token symmetric INT8 activations. INT8 checkpoints are read through compressed-tensors
(int-quantized); lm_head is never quantized."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from quantkit.quant.base import QuantConfig, QuantMethod
from quantkit.quant.w8a8 import INT8, W8A8LinearMethod, W8A8Scheme


@dataclass
class Int8Config(QuantConfig):
    name: ClassVar[str] = "int8"

    @classmethod
    def from_config(cls, config: dict[str, Any], on_the_fly: bool) -> Int8Config:
        if not on_the_fly:
            raise ValueError("a checkpoint with quant_method 'int8' is not a known format: INT8 W8A8 checkpoints "
                             "are read as compressed-tensors (int-quantized)")
        return cls()

    def get_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        return None if prefix == "lm_head" else W8A8LinearMethod(W8A8Scheme(INT8, on_the_fly=True))
