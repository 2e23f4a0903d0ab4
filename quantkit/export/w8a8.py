"""Producer side of compressed-tensors W8A8 (FORMATS.md §3): int-quantized INT8 (preset W8A8) and
float-quantized FP8 (preset FP8_DYNAMIC): per-output-channel symmetric weights, dynamic per-token
activations (nothing stored for them) or static per-tensor activation scales (`input_scale`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quantkit.export.writers import compressed_tensors_config
from quantkit.quant.w8a8 import FP8, INT8, W8Type, quantize_weight

W8_TYPES = {"int8": INT8, "fp8": FP8}


@dataclass
class W8Weights:
    """codes [N, K] int8 | float8_e4m3fn and scale [N, 1] in the storage dtype (the dequant multiplier)."""
    codes: torch.Tensor
    scale: torch.Tensor
    qtype: W8Type

    def dequantize(self) -> torch.Tensor:
        return self.qtype.to_float(self.codes) * self.scale.float()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.codes, "weight_scale": self.scale}


def w8_quantize(weight: torch.Tensor, qtype: W8Type) -> W8Weights:
    """absmax/qmax per output channel, the scale rounded to weight.dtype (llm-compressor stores scales in
    the model dtype) before the codes are rounded against it."""
    _, scale = quantize_weight(weight, qtype)
    scale = scale.to(weight.dtype)
    return W8Weights(qtype.quantize(weight.float(), scale.float()), scale, qtype)


def w8a8_config(qtype: W8Type, static_input: bool = False) -> dict[str, Any]:
    """Dynamic per-token activations (presets W8A8 / FP8_DYNAMIC), or one calibrated static scale per tensor
    (`input_scale` beside each weight)."""
    kind = "int" if qtype.is_int else "float"
    activations = {"num_bits": 8, "type": kind, "strategy": "tensor", "dynamic": False} if static_input else \
        {"num_bits": 8, "type": kind, "strategy": "token", "dynamic": True, "observer": None}
    return compressed_tensors_config("int-quantized" if qtype.is_int else "float-quantized",
                                     {"num_bits": 8, "type": kind, "strategy": "channel"}, activations)
