"""SmoothQuant (Xiao et al.) for one decoder layer: per input channel j of the Linears after each norm,
s_j = max|X_j|^alpha / max|W_j|^(1-alpha); the norm's weight is divided by s and the Linears' columns multiplied
by it (exact in float), moving activation outliers into the weights before per-token INT8 activations and
per-channel INT8 weights (compressed-tensors int-quantized W8A8). alpha = 0 turns smoothing off (plain
per-channel INT8), which is the baseline SmoothQuant is compared against."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantkit.calibrate.layerwise import LayerBatch, LayerResult, decoder_linears
from quantkit.calibrate.weight_only import quantize_linear
from quantkit.export.rtn import Producer


def channel_absmax(x: torch.Tensor) -> torch.Tensor:
    return x.abs().reshape(-1, x.shape[-1]).amax(0).float()


@dataclass
class SmoothQuantQuantizer:
    producer: Producer
    dtype: torch.dtype
    alpha: float = 0.5
    ignore: tuple[str, ...] = ()

    def quantize_layer(self, layer: nn.Module, index: int, batch: LayerBatch | None) -> LayerResult:
        stats = {}
        if self.alpha > 0:
            if batch is None:
                raise ValueError("SmoothQuant needs calibration data")
            kept = set(decoder_linears(layer, self.ignore).values())
            pairs = {name: (norm, linear) for name, (norm, linear) in
                     {"qkv": (layer.input_layernorm, layer.self_attn.qkv_proj),
                      "gate_up": (layer.post_attention_layernorm, layer.mlp.gate_up_proj)}.items() if linear in kept}
            act_max = batch.observe(layer, {name: linear for name, (_, linear) in pairs.items()}, channel_absmax)
            for name, (norm, linear) in pairs.items():
                weight_max = linear.weight.abs().amax(0).float()
                scales = (act_max[name].clamp(min=1e-5).pow(self.alpha) /
                          weight_max.clamp(min=1e-5).pow(1 - self.alpha)).clamp(min=1e-5)
                norm.weight.div_(scales.to(norm.weight))
                linear.weight.mul_(scales.to(linear.weight))
                stats[f"{name}.max_scale"] = float(scales.max())
        tensors = {}
        for linear in decoder_linears(layer, self.ignore).values():
            tensors.update(quantize_linear(linear, self.producer, self.dtype))
        return LayerResult(tensors, stats)
