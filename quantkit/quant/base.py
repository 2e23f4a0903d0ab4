"""The quantization interface. A QuantConfig (parsed from a checkpoint or a `quantization=` argument) hands each
Linear a QuantMethod, which owns that layer's parameters through three formats: checkpoint format (on disk) ->
model format (`create_weights` + loading) -> kernel format (`process_weights_after_loading`)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def set_weight_attrs(param: torch.Tensor, **attrs: Any) -> None:
    """Metadata the loader reads: output_dim / input_dim / packed_dim / pack_factor, or a custom weight_loader."""
    for key, value in attrs.items():
        setattr(param, key, value)


def new_param(shape: tuple[int, ...] | list[int], dtype: torch.dtype, **attrs: Any) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    set_weight_attrs(param, **attrs)
    return param


WeightLoader = Callable[[nn.Parameter, torch.Tensor, "int | None"], None]


class QuantMethod:
    """Per-Linear strategy. `layer` is a quantkit.layers.linear.LinearBase."""

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack into the kernel format by building new tensors (never resize_ in place)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class QuantConfig:
    """Parsed quantization settings for a whole model."""
    name: str = "base"

    def get_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        """The method for the Linear at `prefix` (e.g. 'model.layers.0.self_attn.qkv_proj'); None = unquantized."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantConfig":
        """From a checkpoint's `quantization_config` (or just {'quant_method': name} for on-the-fly)."""
        raise NotImplementedError
