"""The quantization interface. A QuantConfig (parsed from a checkpoint or a `quantization=` argument) hands each
Linear a QuantMethod, which owns that layer's parameters through three formats: checkpoint format (on disk) ->
model format (`create_weights` + loading) -> kernel format (`process_weights_after_loading`)."""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Callable

import torch
from torch import nn


def set_weight_attrs(param: torch.Tensor, **attrs: Any) -> None:
    """Metadata the loader reads: output_dim / input_dim / packed_dim / pack_factor, per_shard, or a custom
    weight_loader(param, loaded, shard_id)."""
    for key, value in attrs.items():
        setattr(param, key, value)


def new_param(shape: tuple[int, ...] | list[int], dtype: torch.dtype, **attrs: Any) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    set_weight_attrs(param, **attrs)
    return param


def replace_param(layer: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Swap a parameter for a new tensor (the kernel format); None deletes it. Never resizes in place."""
    if hasattr(layer, name):
        delattr(layer, name)
    if value is not None:
        layer.register_parameter(name, nn.Parameter(value, requires_grad=False))


WeightLoader = Callable[[nn.Parameter, torch.Tensor, "int | None"], None]


class QuantMethod:
    """Per-Linear strategy. `layer` is a quantkit.layers.linear.Linear."""
    # The 8-bit type (quant.w8a8.W8Type) in which `apply` also takes its activation already quantized per token
    # (a quant.w8a8.QuantizedActivation), so the op before the layer can emit it fused; None: float input only.
    input_quant: Any = None

    def input_quant_for(self, tokens: int, dtype: torch.dtype) -> Any:
        """What the op before the layer should emit for a call of `tokens` rows of `dtype` activations."""
        return self.input_quant

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack into the kernel format by building new tensors (never resize_ in place)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def input_permutation(self, layer: nn.Module) -> torch.Tensor | None:
        """The order in which the layer reads its input columns (act-order: x[..., perm]); None: as they come."""
        return None

    def drop_input_permutation(self, layer: nn.Module) -> None:
        """The op before the layer now writes its input columns in `input_permutation` order: stop gathering."""
        raise NotImplementedError(f"{type(self).__name__} reads its input columns as they come")

    def permute_outputs(self, layer: nn.Module, order: torch.Tensor) -> bool:
        """Reorder the output columns (new column j = old column order[j]); False where the format cannot."""
        return False


class QuantConfig:
    """Parsed quantization settings for a whole model."""
    name: str = "base"

    @classmethod
    def from_config(cls, config: dict[str, Any], on_the_fly: bool) -> "QuantConfig":
        """From a checkpoint's `quantization_config` (on_the_fly=False), or from `quantization=NAME` over an
        unquantized checkpoint (on_the_fly=True, config = {'quant_method': NAME})."""
        raise NotImplementedError

    def get_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        """The method for the Linear at `prefix` (e.g. 'model.layers.0.self_attn.qkv_proj'); None = unquantized."""
        raise NotImplementedError

    def verify(self, model_config: Any) -> None:
        """Checks that need only the model's config (group size vs every input width, ...), before any weight
        is read. Raises ValueError naming the layer."""


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Module-name matching used by ignore lists: exact name, a name ending in '.pattern', or 're:<regex>'."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def layer_skipped(layer: nn.Module, patterns: Iterable[str]) -> bool:
    """Whether every checkpoint module of `layer` is ignored. A merged layer whose shards disagree cannot be
    half quantized: that is an error naming the shards."""
    patterns = list(patterns)
    flags = [matches_any(p, patterns) for p in layer.checkpoint_prefixes]
    if any(flags) and not all(flags):
        raise ValueError(f"layer {layer.prefix}: the ignore list skips only some of its merged modules "
                         f"{layer.checkpoint_prefixes}; they must be quantized alike")
    return all(flags)
