"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum, FORMATS.md §1) and RTN, an on-the-fly round-to-nearest of
an unquantized checkpoint with the GPTQ quantizer. Both end in the WNA16 kernel format (quant/wna16.py).

Checkpoint tensors per Linear: qweight int32 [K*b/32, N] packed along K; qzeros int32 [NG, N*b/32] packed
along N (v1 "gptq" stores z-1, v2 "gptq_v2" stores z); scales float [NG, N]; g_idx int32 [K]."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from quantkit.quant.base import (
    QuantConfig,
    QuantMethod,
    matches_any,
    new_param,
    replace_param,
)
from quantkit.quant.primitives import (
    SUPPORTED_BITS,
    minmax_qparams,
    pack,
    quantize,
    unpack,
)
from quantkit.quant.wna16 import WNA16Method, g_idx_param, merged_g_idx, verify_linears

logger = logging.getLogger(__name__)

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


@dataclass
class GPTQConfig(QuantConfig):
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"
    lm_head: bool = False
    dynamic: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules_in_block_to_quantize: list[str] | None = None
    name = "gptq"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"gptq: bits={self.bits} is not supported (supported: {SUPPORTED_BITS})")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"gptq: group_size={self.group_size} must be -1 (per channel) or > 0")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"gptq: checkpoint_format={self.checkpoint_format!r} is not supported "
                             f"(supported: {CHECKPOINT_FORMATS}; Marlin-repacked checkpoints are not)")
        self.v2_zeros_seen = False  # Pitfall 1 is warned about once per model

    @classmethod
    def from_config(cls, config: dict[str, Any], on_the_fly: bool) -> GPTQConfig:
        if on_the_fly:
            raise ValueError("quantization='gptq' needs a GPTQ-quantized checkpoint (GPTQ calibrates); "
                             "use quantization='rtn' to quantize an unquantized checkpoint on the fly")
        if config.get("pack_dtype", "int32") != "int32":
            raise ValueError(f"gptq: pack_dtype={config['pack_dtype']!r} is not supported (only int32)")
        if "sym" not in config:
            logger.warning("gptq config has no 'sym'; assuming sym=True as other loaders do")
        blocks = config.get("modules_in_block_to_quantize")
        return cls(bits=int(config.get("bits", 4)), group_size=int(config.get("group_size", 128)),
                   desc_act=bool(config.get("desc_act", False)), sym=bool(config.get("sym", True)),
                   checkpoint_format=str(config.get("checkpoint_format") or config.get("format") or "gptq"),
                   lm_head=bool(config.get("lm_head", False)), dynamic=dict(config.get("dynamic") or {}),
                   modules_in_block_to_quantize=None if blocks is None else _flatten(blocks))

    def verify(self, model_config: Any) -> None:
        verify_linears(self, model_config)

    def get_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        if prefix == "lm_head" and not self.lm_head:
            return None
        names = layer.checkpoint_prefixes
        if self.modules_in_block_to_quantize is not None and prefix != "lm_head" and \
                not all(matches_any(n, self.modules_in_block_to_quantize) for n in names):
            return None
        overrides = {_resolve_dynamic(self.dynamic, n) for n in names}
        if len(overrides) > 1:
            raise ValueError(f"layer {prefix}: gptq 'dynamic' treats its merged modules {names} differently; "
                             "they must be quantized alike")
        override = overrides.pop()
        if override == "skip":
            return None
        cfg = replace(self, **dict(override)) if override else self
        return GPTQMethod(cfg, self)


def _flatten(blocks: list[Any]) -> list[str]:
    """modules_in_block_to_quantize: [['self_attn.q_proj', ...], ['mlp.up_proj']] or a flat list."""
    return [n for b in blocks for n in ([b] if isinstance(b, str) else b)]


def _resolve_dynamic(dynamic: dict[str, dict[str, Any]], name: str) -> str | tuple | None:
    """GPTQModel 'dynamic': '-:regex' skips a module, '+:regex' or a bare regex overrides bits/group_size/
    desc_act/sym. Returns 'skip', a hashable override, or None. The first matching rule wins."""
    for key, value in dynamic.items():
        negative, pattern = key.startswith("-:"), re.sub(r"^[+-]:", "", key)
        if re.match(pattern, name):
            if negative:
                return "skip"
            allowed = {"bits", "group_size", "desc_act", "sym"}
            unknown = set(value) - allowed
            if unknown:
                raise ValueError(f"gptq dynamic rule {key!r}: overrides {sorted(unknown)} are not supported "
                                 f"(supported: {sorted(allowed)})")
            return tuple(sorted(value.items()))
    return None


class GPTQMethod(WNA16Method):
    k_words_exact = True

    def __init__(self, cfg: GPTQConfig, model_cfg: GPTQConfig) -> None:
        super().__init__(cfg.bits, cfg.group_size)
        self.cfg, self.model_cfg = cfg, model_cfg

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        n, (_, ng), f = sum(output_sizes), self.groups(input_size), self.pack_factor
        layer.qweight = new_param((int(input_size / f), n), torch.int32, input_dim=0, output_dim=1,
                                  packed_dim=0, pack_factor=f)
        layer.qzeros = new_param((ng, int(n / f)), torch.int32, output_dim=1, packed_dim=1, pack_factor=f)
        layer.scales = new_param((ng, n), params_dtype, output_dim=1)
        layer.g_idx = g_idx_param(input_size, len(output_sizes))
        self.params_dtype = params_dtype

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        stored = unpack(layer.qzeros.data, self.bits, layer.output_size, dim=1)
        self.set_kernel_format(layer, layer.qweight.data, self._true_zeros(stored, layer),
                               layer.scales.data, merged_g_idx(layer, layer.g_idx.data), self.params_dtype)
        replace_param(layer, "g_idx", None)

    def _true_zeros(self, stored: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """v1 stores z-1 (and borrows where z = 0): z = (stored + 1) & mask. Pitfall 1: sym zeros of exactly
        2^(b-1) under "gptq" are v2 zeros mislabelled; those are taken as they are, with a warning."""
        mid = 2 ** (self.bits - 1)
        if self.cfg.checkpoint_format == "gptq_v2":
            return stored
        if self.cfg.sym and bool((stored == mid).all()):
            if not self.model_cfg.v2_zeros_seen:
                logger.warning("%s: checkpoint_format is 'gptq' but the symmetric zeros are %d (v2 style, "
                               "Pitfall 1); reading them as gptq_v2", layer.prefix, mid)
                self.model_cfg.v2_zeros_seen = True
            return stored
        return (stored + 1) & (2 ** self.bits - 1)


@dataclass
class RTNConfig(QuantConfig):
    """Round-to-nearest of an unquantized checkpoint at load time ({'quant_method': 'rtn', 'bits': 4|8,
    'group_size': G, 'sym': bool, 'desc_act': bool}); decoder Linears only, lm_head stays unquantized.
    desc_act groups the input channels in a random (seeded) order, the layout an act-order GPTQ checkpoint
    gives the kernels: it exists so dummy-weight benchmarks measure act-order kernels (RTN has no activations
    to order by)."""
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    name = "rtn"

    def __post_init__(self) -> None:
        WNA16Method(self.bits, self.group_size)  # validates bits and group_size

    @classmethod
    def from_config(cls, config: dict[str, Any], on_the_fly: bool) -> RTNConfig:
        unknown = set(config) - {"quant_method", "bits", "group_size", "sym", "desc_act"}
        if unknown:
            raise ValueError(f"rtn: unknown config keys {sorted(unknown)} (known: bits, group_size, sym, desc_act)")
        return cls(bits=int(config.get("bits", 4)), group_size=int(config.get("group_size", 128)),
                   sym=bool(config.get("sym", True)), desc_act=bool(config.get("desc_act", False)))

    def verify(self, model_config: Any) -> None:
        verify_linears(self, model_config)

    def get_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        return None if prefix == "lm_head" else RTNMethod(self)


class RTNMethod(WNA16Method):
    """Loads the float weight [N, K], then quantizes it (GPTQ quantizer) into the kernel format."""
    full_groups = True
    n_words_exact = False

    def __init__(self, cfg: RTNConfig) -> None:
        super().__init__(cfg.bits, cfg.group_size)
        self.sym = cfg.sym
        self.desc_act = cfg.desc_act

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        layer.weight = new_param((sum(output_sizes), input_size), params_dtype, output_dim=0, input_dim=1)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        w = layer.weight.data
        k = w.shape[1]
        order = torch.randperm(k, generator=torch.Generator(w.device).manual_seed(k), device=w.device) \
            if self.desc_act else None
        grouped = w if order is None else w[:, order]
        scales, zeros = minmax_qparams(grouped, self.bits, self.group_size, self.sym)
        codes = quantize(grouped, scales, zeros, self.bits, self.group_size)
        g_idx = None
        if order is not None:  # back to the original channel order, with each channel's group in g_idx
            codes = torch.empty_like(codes).index_copy_(1, order, codes)
            g, _ = self.groups(k)
            g_idx = torch.empty(k, dtype=torch.int32, device=w.device).index_copy_(
                0, order, (torch.arange(k, device=w.device) // g).to(torch.int32))
        self.set_kernel_format(layer, pack(codes.t(), self.bits, dim=0), zeros.t(), scales.t(), g_idx, w.dtype)
        replace_param(layer, "weight", None)
