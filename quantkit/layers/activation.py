import torch
import torch.nn.functional as F
from torch import nn

from quantkit.layers.fused import triton_ops
from quantkit.quant.w8a8 import QuantizedActivation, W8Type, quantize_activation


class SiluAndMul(nn.Module):
    """SwiGLU gate: input is the merged [gate | up] projection, [T, 2*I] -> [T, I]; with `quant`, quantized per
    token for a following dynamic W8A8 Linear (a QuantizedActivation)."""

    def forward(self, x: torch.Tensor, quant: W8Type | None = None) -> torch.Tensor | QuantizedActivation:
        ops = triton_ops(x)
        if ops is not None:
            return ops.silu_and_mul(x, quant)
        gate, up = x.chunk(2, dim=-1)
        out = F.silu(gate) * up
        return out if quant is None else quantize_activation(out, quant)
