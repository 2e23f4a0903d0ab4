"""Linear layers built through the quantization interface, so the model never knows which method runs.
Merged projections (qkv, gate_up) are one layer with several output shards; each checkpoint tensor names its
shard and lands in its slice of the parameter."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from quantkit.quant.base import QuantConfig, QuantMethod, new_param
from quantkit.quant.unquantized import UnquantizedMethod

if TYPE_CHECKING:
    from quantkit.quant.w8a8 import QuantizedActivation


class Linear(nn.Module):
    """y = x W^T (+ b). `output_sizes` lists the shards of a merged projection ([N] for a plain layer)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, params_dtype: torch.dtype,
                 quant_config: QuantConfig | None = None, prefix: str = "",
                 shard_names: list[str] | None = None) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(output_sizes)
        self.prefix = prefix
        # The checkpoint's module names for this layer (one per shard of a merged projection): quantization
        # configs match their ignore lists and per-module overrides against these.
        parent = prefix.rpartition(".")[0]
        self.checkpoint_prefixes = [f"{parent}.{n}" if parent else n for n in shard_names] if shard_names \
            else [prefix]
        method = quant_config.get_method(self, prefix) if quant_config is not None else None
        self.quant_method: QuantMethod = method or UnquantizedMethod()
        self.quant_method.create_weights(self, input_size, self.output_sizes, params_dtype)
        self.bias = new_param((self.output_size,), params_dtype, output_dim=0) if bias else None

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        """x: float activations, or codes the op before quantized for it (only when quant_method.input_quant)."""
        return self.quant_method.apply(self, x, self.bias)

    def take_input_permutation(self) -> torch.Tensor | None:
        """The order in which the layer reads its input columns (act-order), which the op before it now writes
        them in: the layer stops gathering. None (nothing changes) when it reads them as they come."""
        perm = self.quant_method.input_permutation(self)
        if perm is None:
            return None
        self.quant_method.drop_input_permutation(self)
        return perm.data

    def permute_outputs(self, order: torch.Tensor) -> bool:
        """Output column j becomes the old column order[j] (bias included); False (unchanged) where the
        quantization format cannot reorder its columns."""
        if not self.quant_method.permute_outputs(self, order):
            return False
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias[order].contiguous(), requires_grad=False)
        return True

    def shard_ids(self, param: nn.Parameter) -> list[int | None]:
        """The loads a parameter expects: one per shard when it is split along the output, else one whole."""
        if len(self.output_sizes) > 1 and (hasattr(param, "output_dim") or getattr(param, "per_shard", False)):
            return list(range(len(self.output_sizes)))
        return [None]

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None) -> None:
        """Copy a checkpoint tensor into `param` (or into shard `shard_id`'s slice of it)."""
        custom = getattr(param, "weight_loader", None)
        if custom is not None:
            custom(param, loaded, shard_id)
            return
        target = param.data
        if shard_id is not None:
            dim = param.output_dim
            divisor = getattr(param, "pack_factor", 1) if getattr(param, "packed_dim", None) == dim else 1
            offset = sum(self.output_sizes[:shard_id]) // divisor
            target = target.narrow(dim, offset, self.output_sizes[shard_id] // divisor)
        copy_checked(target, loaded)


def copy_checked(target: torch.Tensor, loaded: torch.Tensor) -> None:
    """Shape must match exactly; floats convert between float dtypes, anything else must match exactly."""
    if tuple(target.shape) != tuple(loaded.shape):
        raise ValueError(f"shape {tuple(loaded.shape)} does not match the expected {tuple(target.shape)}")
    same_kind = target.dtype.is_floating_point and loaded.dtype.is_floating_point \
        and target.element_size() > 1 and loaded.element_size() > 1
    if loaded.dtype != target.dtype and not same_kind:
        raise ValueError(f"dtype {loaded.dtype} does not match the expected {target.dtype}")
    target.copy_(loaded)
