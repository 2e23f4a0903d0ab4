"""`quant_method: fp8` checkpoints (FORMATS.md §4) and `quantization="fp8"` on the fly.
- per-tensor (AutoFP8 / vLLM): `weight` float8_e4m3fn [N, K], `weight_scale` fp32 scalar per shard, `input_scale`
  scalar per shard when `activation_scheme: static`; merged shards take the max scale and are requantized.
- block (`weight_block_size: [bn, bk]`): `weight_scale_inv` fp32 [ceil(N/bn), ceil(K/bk)] per shard, a dequant
  multiplier despite its name; activations dynamic in groups of bk along K.
- on the fly: E4M3 weights with per-output-channel scales amax/448, dynamic per-token activations.
lm_head is never quantized (AutoFP8 and transformers skip it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from quantkit.quant.base import QuantConfig, QuantMethod, layer_skipped
from quantkit.quant.w8a8 import FP8, W8A8LinearMethod, W8A8Scheme


@dataclass
class Fp8Config(QuantConfig):
    name: ClassVar[str] = "fp8"
    activation_scheme: str = "dynamic"
    weight_block_size: tuple[int, int] | None = None
    ignored_layers: list[str] = field(default_factory=list)
    on_the_fly: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any], on_the_fly: bool) -> Fp8Config:
        fmt = str(config.get("fmt", "e4m3")).lower()
        if fmt != "e4m3":
            raise ValueError(f"fp8 quantization_config fmt={fmt!r}: FP8 weights must be E4M3 (float8_e4m3fn); "
                             f"E5M2 is a KV-cache format only (kv_cache_dtype='fp8_e5m2')")
        scheme = str(config.get("activation_scheme", "dynamic"))
        if scheme not in ("static", "dynamic"):
            raise ValueError(f"fp8 activation_scheme={scheme!r} must be 'static' or 'dynamic'")
        block = config.get("weight_block_size")
        if block is not None:
            if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
                raise ValueError(f"fp8 weight_block_size={block!r} must be two positive ints [block_n, block_k]")
            if scheme != "dynamic":
                raise ValueError("fp8 block quantization (weight_block_size) needs activation_scheme 'dynamic'")
            block = (block[0], block[1])
        if on_the_fly and scheme == "static":
            raise ValueError("quantization='fp8' over an unquantized checkpoint has no calibrated input scales: "
                             "activation_scheme must be 'dynamic'")
        ignored = list(config.get("ignored_layers") or []) + list(config.get("modules_to_not_convert") or [])
        return cls(scheme, block, ignored, on_the_fly)

    def get_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        if prefix == "lm_head" or layer_skipped(layer, self.ignored_layers):
            return None
        if self.on_the_fly:
            return W8A8LinearMethod(W8A8Scheme(FP8, on_the_fly=True))
        if self.weight_block_size is not None:
            return W8A8LinearMethod(W8A8Scheme(FP8, "block", block=self.weight_block_size,
                                               scale_name="weight_scale_inv"))
        return W8A8LinearMethod(W8A8Scheme(FP8, "tensor", static_input=self.activation_scheme == "static"))
