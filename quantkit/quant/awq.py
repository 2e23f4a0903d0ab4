"""AutoAWQ GEMM checkpoints (FORMATS.md §2), converted at load into the WNA16 kernel format (quant/wna16.py).

Checkpoint tensors per Linear (4-bit only): qweight int32 [K, N/8] packed along N with the AWQ interleave (slot i
of word c holds column 8c + AWQ_ORDER[i]); qzeros int32 [K/G, N/8] likewise; scales float [K/G, N]. Zeros are
stored as they are (no -1). W[n, k] = scales[k//G, n] * (q[k, n] - z[k//G, n])."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantkit.quant.base import QuantConfig, QuantMethod, layer_skipped, new_param
from quantkit.quant.primitives import awq_deinterleave, pack, unpack
from quantkit.quant.wna16 import WNA16Method, verify_linears


@dataclass
class AWQConfig(QuantConfig):
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    version: str = "gemm"
    modules_to_not_convert: list[str] = field(default_factory=list)
    name = "awq"

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise ValueError(f"awq: bits={self.bits} is not supported (AutoAWQ GEMM is 4-bit only)")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"awq: group_size={self.group_size} must be -1 or > 0")
        if self.version != "gemm":
            raise ValueError(f"awq: version {self.version!r} is not supported; only 'gemm' is (the gemv and "
                             "gemv_fast layouts pack along K with padding, a different format)")
        if not self.zero_point:
            raise ValueError("awq: zero_point=false is not supported (AutoAWQ GEMM always stores zeros)")

    @classmethod
    def from_config(cls, config: dict[str, Any], on_the_fly: bool) -> AWQConfig:
        if on_the_fly:
            raise ValueError("quantization='awq' needs an AWQ-quantized checkpoint (AWQ calibrates); "
                             "use quantization='rtn' to quantize an unquantized checkpoint on the fly")
        def pick(*keys: str, default: Any) -> Any:  # AutoAWQ's own names and transformers' both occur
            return next((config[k] for k in keys if config.get(k) is not None), default)
        return cls(bits=int(pick("bits", "w_bit", default=4)),
                   group_size=int(pick("group_size", "q_group_size", default=128)),
                   zero_point=bool(pick("zero_point", default=True)),
                   version=str(pick("version", default="gemm")).lower(),
                   modules_to_not_convert=list(pick("modules_to_not_convert", default=[])))

    def verify(self, model_config: Any) -> None:
        verify_linears(self, model_config)

    def get_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        if prefix == "lm_head" or layer_skipped(layer, self.modules_to_not_convert):
            return None
        return AWQMethod(self.group_size)


class AWQMethod(WNA16Method):
    full_groups = True

    def __init__(self, group_size: int) -> None:
        super().__init__(4, group_size)

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        n, (_, ng) = sum(output_sizes), self.groups(input_size)
        layer.qweight = new_param((input_size, n // 8), torch.int32, input_dim=0, output_dim=1, packed_dim=1,
                                  pack_factor=8)
        layer.qzeros = new_param((ng, n // 8), torch.int32, output_dim=1, packed_dim=1, pack_factor=8)
        layer.scales = new_param((ng, n), params_dtype, output_dim=1)
        self.params_dtype = params_dtype

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        n = layer.output_size
        codes = awq_deinterleave(unpack(layer.qweight.data, 4, n, dim=1))  # [K, N]
        zeros = awq_deinterleave(unpack(layer.qzeros.data, 4, n, dim=1))   # [NG, N]
        self.set_kernel_format(layer, pack(codes, 4, dim=0), zeros, layer.scales.data, None, self.params_dtype)
