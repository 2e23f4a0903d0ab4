import torch
import torch.nn.functional as F
from torch import nn

from quantkit.quant.base import QuantMethod, new_param


class UnquantizedMethod(QuantMethod):
    """A plain 16/32-bit weight [N, K]: just another quant method, so every Linear takes the same path."""

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        layer.weight = new_param((sum(output_sizes), input_size), params_dtype, output_dim=0, input_dim=1)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)
