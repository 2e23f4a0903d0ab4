"""GPTQ over one decoder layer, for the layer-by-layer driver: the Linears are solved in execution order (qkv,
o, gate_up, down), each from inputs that already see its quantized predecessors (AutoGPTQ's true_sequential).
Merged qkv / gate_up share one Hessian (same input), and GPTQ treats output rows independently, so solving the
merged weight equals solving each shard."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantkit.calibrate.gptq import (
    GPTQConfig,
    GPTQResult,
    HessianAccumulator,
    gptq_quantize,
)
from quantkit.calibrate.layerwise import (
    LayerBatch,
    LayerResult,
    decoder_linears,
    linear_shards,
)
from quantkit.export.wna16 import IntWeights, gptq_tensors
from quantkit.layers.linear import Linear


@dataclass
class GPTQQuantizer:
    """checkpoint_format: 'gptq' (v1, symmetric) or 'gptq_v2' (asymmetric: v1 cannot hold a zero point of 0).
    dtype: the storage dtype of the scales."""
    config: GPTQConfig
    dtype: torch.dtype
    checkpoint_format: str = "gptq"
    ignore: tuple[str, ...] = ()

    def quantize_layer(self, layer: nn.Module, index: int, batch: LayerBatch | None) -> LayerResult:
        if batch is None:
            raise ValueError("GPTQ needs calibration data")
        tensors, stats = {}, {}
        for path, linear in decoder_linears(layer, self.ignore).items():
            hessian = _hessian(layer, linear, batch)
            original = linear.weight.float().clone()
            result = gptq_quantize(original, hessian, self.config)
            linear.weight.copy_(result.weight)
            delta = result.weight - original
            # Proxy of the output error GPTQ minimizes: tr(dW H dW^T) / tr(W H W^T).
            stats[f"{path}.loss"] = float(((delta @ hessian) * delta).sum() / ((original @ hessian) * original).sum())
            for name, q in self._shards(linear, result).items():
                tensors.update({f"{name}.{k}": v.cpu() for k, v in gptq_tensors(q, self.checkpoint_format).items()})
        return LayerResult(tensors, stats)

    def _shards(self, linear: Linear, result: GPTQResult) -> dict[str, IntWeights]:
        """Checkpoint module name -> its rows of the solved merged weight, in the writer's layout."""
        cfg = self.config
        g_idx = result.g_idx.cpu() if cfg.desc_act and not cfg.static_groups else None
        return {name: IntWeights(result.codes[rows].cpu(), result.scales[:, rows].t().to(self.dtype).cpu(),
                                 result.zeros[:, rows].t().cpu(), cfg.bits, cfg.group_size,
                                 None if g_idx is None else g_idx.clone())  # shared storage cannot be saved
                for name, rows in linear_shards(linear)}


def _hessian(layer: nn.Module, linear: Linear, batch: LayerBatch) -> torch.Tensor:
    acc = HessianAccumulator(linear.input_size, linear.weight.device)
    hook = linear.register_forward_pre_hook(lambda _m, args: acc.add_batch(args[0]))
    try:
        batch.run(layer)
    finally:
        hook.remove()
    return acc.hessian
