"""Quantizing a decoder layer's Linears with a format's round-to-nearest producer: the whole job for rtn, fp8
(dynamic or static activations), nf4/fp4 and plain int8, and the last step of AWQ and SmoothQuant, which first
transform the weights and then quantize them exactly like this."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantkit.calibrate.layerwise import (
    LayerBatch,
    LayerResult,
    decoder_linears,
    linear_shards,
)
from quantkit.export.rtn import Producer
from quantkit.layers.linear import Linear
from quantkit.quant.w8a8 import FP8


def quantize_linear(linear: Linear, producer: Producer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each shard's weight (cast to the storage dtype, as the producer rounds its scales to it) through the
    producer; the Linear's weight becomes the dequantized result. Returns checkpoint name -> tensor."""
    tensors = {}
    for name, rows in linear_shards(linear):
        q = producer.quantize(linear.weight[rows].to(dtype))
        linear.weight[rows] = q.dequantize().to(linear.weight)
        tensors.update({f"{name}.{k}": v.cpu() for k, v in producer.tensors(q).items()})
    return tensors


def absmax(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax().float()


@dataclass
class WeightOnlyQuantizer:
    """static_inputs: also record each Linear's input absmax over the calibration tokens and write the
    per-tensor FP8 `input_scale` (= absmax / 448) per shard (compressed-tensors static activations)."""
    producer: Producer
    dtype: torch.dtype
    static_inputs: bool = False
    ignore: tuple[str, ...] = ()

    def quantize_layer(self, layer: nn.Module, index: int, batch: LayerBatch | None) -> LayerResult:
        linears = decoder_linears(layer, self.ignore)
        amax = batch.observe(layer, linears, absmax) if self.static_inputs else {}
        tensors = {}
        for path, linear in linears.items():
            tensors.update(quantize_linear(linear, self.producer, self.dtype))
            if self.static_inputs:
                scale = (amax[path] / FP8.qmax).clamp(min=1e-12).reshape(1).cpu()
                tensors.update({f"{name}.input_scale": scale.clone() for name, _ in linear_shards(linear)})
        return LayerResult(tensors)
