import torch
from torch import nn

from quantkit.layers.fused import triton_ops
from quantkit.quant.w8a8 import QuantizedActivation, W8Type, quantize_activation


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as transformers does), optionally fused with the residual add and with the
    per-token quantization a following dynamic W8A8 Linear would apply to its input (`quant`). `out_perm` (set
    when an act-order Linear hands over its input permutation) writes output column j from input column
    out_perm[j]; the residual keeps its order."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.register_buffer("out_perm", None, persistent=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, quant: W8Type | None = None
                ) -> torch.Tensor | QuantizedActivation | tuple[torch.Tensor | QuantizedActivation, torch.Tensor]:
        """-> out, or (out, x + residual) when given a residual; out is a QuantizedActivation when `quant` is set."""
        ops = triton_ops(x)
        if ops is not None:
            out, residual = ops.rms_norm(x, self.weight, self.eps, residual, quant, self.out_perm)
            return out if residual is None else (out, residual)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        if self.out_perm is not None:
            out = out.index_select(-1, self.out_perm)
        if quant is not None:
            out = quantize_activation(out, quant)
        return out if residual is None else (out, residual)
