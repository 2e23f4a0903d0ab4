"""bitsandbytes 4-bit (NF4 / FP4) weight-only quantization: transformers-serialized checkpoints
(`quant_method: bitsandbytes`, load_in_4bit) and on-the-fly `quantization="nf4" | "fp4"` over a 16/32-bit
checkpoint (blocksize 64, double quant, as bitsandbytes.functional.quantize_4bit: see bnb_format).

Kernel format (after process_weights_after_loading), for a Linear with shards N_0..N_{S-1} (N = sum),
K = in_features (a multiple of blocksize B = 64), nb_s = N_s*K/B absmax blocks in shard s,
g_s = ceil(nb_s/256) nested groups in shard s, G = sum g_s:
    weight_packed        uint8   [N, K//2]   w[n, 2i] in the HIGH nibble of byte [n, i], w[n, 2i+1] in the low
    weight_absmax        uint8   [N, K//B]   double quant: codes into weight_nested_code
                         float32 [N, K//B]   without double quant: the absmax itself
  double quant only:
    weight_nested_code   float32 [256]       bitsandbytes' signed dynamic map (the checkpoint's nested_quant_map)
    weight_nested_absmax float32 [G]         per nested group, shards concatenated in order
    weight_nested_offset float32 [G]         each shard's nested_offset, repeated over its g_s groups
    group_index(layer):  int64 [N*K/B]   nested group of absmax block j (row-major over [N, K//B]): the
        absmax blocks of shard s (rows R_s .. R_s+N_s) form groups of 256 counted from the shard's first block:
        group(j) = sum_{t<s} g_t + (j - R_s*K/B) // 256.  (layer.bnb_shard_blocks = (nb_0, ..., nb_{S-1}).)
    absmax[n, kb] = nested_code[weight_absmax[n, kb]] * nested_absmax[g] + nested_offset[g]   (fp32, mul then add)
    W[n, k] = code4[nibble(n, k)] * absmax[n, k // B]   (fp32), code4 = bnb_format.code4(quant_type)
Storage: 4 + 8/64 + 64/(64*256) bits per weight plus 1 KiB per layer (the map) = ~4.13 bits/weight."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.kernels.select import select_kernels
from quantkit.layers.linear import copy_checked
from quantkit.quant import bnb_format as fmt
from quantkit.quant.base import (
    QuantConfig,
    QuantMethod,
    layer_skipped,
    new_param,
    replace_param,
)

_FLOAT_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class BitsAndBytesConfig(QuantConfig):
    """transformers' BitsAndBytesConfig (4-bit) or on-the-fly 'nf4' / 'fp4' (double quant, blocksize 64)."""
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "float32"   # transformers' runtime hint; apply() computes in the activation dtype
    quant_storage: str = "uint8"
    load_in_8bit: bool = False
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    on_the_fly: bool = False
    blocksize: int = 64
    name = "bitsandbytes"

    @classmethod
    def from_config(cls, config: dict[str, Any], on_the_fly: bool) -> BitsAndBytesConfig:
        if on_the_fly:
            return cls(quant_type="fp4" if config.get("quant_method") == "fp4" else "nf4", on_the_fly=True)
        if not (config.get("load_in_4bit") or config.get("_load_in_4bit") or config.get("load_in_8bit")
                or config.get("_load_in_8bit")):
            raise ValueError("quantization_config (bitsandbytes): neither load_in_4bit nor load_in_8bit is set")
        skip = config.get("llm_int8_skip_modules")
        return cls(quant_type=config.get("bnb_4bit_quant_type", "fp4"),  # transformers' default is fp4
                   double_quant=bool(config.get("bnb_4bit_use_double_quant", False)),
                   compute_dtype=_dtype_name(config.get("bnb_4bit_compute_dtype") or "float32"),
                   quant_storage=_dtype_name(config.get("bnb_4bit_quant_storage") or "uint8"),
                   load_in_8bit=bool(config.get("load_in_8bit") or config.get("_load_in_8bit")),
                   skip_modules=["lm_head"] if skip is None else list(skip))

    def verify(self, model_config: Any) -> None:
        where = "quantization_config (bitsandbytes)"
        if self.load_in_8bit:
            raise ValueError(f"{where}: load_in_8bit (LLM.int8) checkpoints are not supported; only load_in_4bit")
        if self.quant_type not in fmt.QUANT_TYPES:
            raise ValueError(f"{where}: bnb_4bit_quant_type {self.quant_type!r} is not one of {fmt.QUANT_TYPES}")
        if self.quant_storage != "uint8":
            raise ValueError(f"{where}: bnb_4bit_quant_storage {self.quant_storage!r} is not supported (uint8 only)")
        if self.compute_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{where}: bnb_4bit_compute_dtype {self.compute_dtype!r} is not one of {_FLOAT_DTYPES}")
        q_size = model_config.num_attention_heads * model_config.head_dim
        widths = {"qkv_proj/gate_up_proj/lm_head": model_config.hidden_size, "o_proj": q_size,
                  "down_proj": model_config.intermediate_size}
        for layers, k in widths.items():
            if k % self.blocksize:
                raise ValueError(f"{where}: in_features {k} of {layers} is not a multiple of the 4-bit blocksize "
                                 f"{self.blocksize}, which the packed kernel format needs")

    def get_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        return None if layer_skipped(layer, self.skip_modules) else BnB4bitMethod(self)


def _dtype_name(value: Any) -> str:
    return str(value).removeprefix("torch.")


class BnB4bitMethod(QuantMethod):
    def __init__(self, config: BitsAndBytesConfig) -> None:
        self.config = config

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        self.params_dtype = params_dtype  # the activation dtype, which kernels that take only 16-bit floats check
        if self.config.on_the_fly:
            layer.weight = new_param((sum(output_sizes), input_size), params_dtype, output_dim=0, input_dim=1)
            return
        c, shards = self.config, len(output_sizes)
        numels = [n * input_size for n in output_sizes]
        blocks = [math.ceil(n / c.blocksize) for n in numels]
        groups = [math.ceil(b / fmt.NESTED_BLOCKSIZE) for b in blocks]
        layer.bnb_states = [None] * shards
        layer.bnb_segments = {}  # param name -> each shard's length along dim 0

        def add(name: str, sizes: list[int], dtype: torch.dtype, tail: tuple[int, ...] = ()) -> None:
            loader = partial(_load_segment, sizes)
            setattr(layer, name, new_param((sum(sizes), *tail), dtype, per_shard=True, weight_loader=loader))
            layer.bnb_segments[name] = sizes

        add("weight", [math.ceil(n / 2) for n in numels], torch.uint8, (1,))
        add("weight_absmax", blocks, torch.uint8 if c.double_quant else torch.float32)
        add("weight_quant_map", [16] * shards, torch.float32)
        if c.double_quant:
            add("weight_nested_absmax", groups, torch.float32)
            add("weight_nested_quant_map", [256] * shards, torch.float32)
        state = new_param((0,), torch.uint8, per_shard=True, weight_loader=partial(self._load_state, layer))
        setattr(layer, f"weight_quant_state_bitsandbytes__{c.quant_type}", state)

    def _load_state(self, layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, shard: int | None) -> None:
        """Parses and checks one shard's quant_state JSON against the config and the shard's [N_s, K]."""
        s, c = shard or 0, self.config
        where = f"layer {layer.prefix} ({layer.checkpoint_prefixes[s]}.weight)"
        state = fmt.parse_quant_state(loaded, where)
        expected = {"quant_type": c.quant_type, "blocksize": c.blocksize,
                    "shape": [layer.output_sizes[s], layer.input_size]}
        for key, value in expected.items():
            if state[key] != value:
                source = "model" if key == "shape" else "config"
                raise ValueError(f"{where}: quant_state says {key}={state[key]!r} but the {source} needs {value!r}")
        nested = "nested_offset" in state
        if nested != c.double_quant or (nested and state.get("nested_blocksize") != fmt.NESTED_BLOCKSIZE):
            raise ValueError(f"{where}: quant_state double quantization ({nested}, nested_blocksize "
                             f"{state.get('nested_blocksize')}) disagrees with bnb_4bit_use_double_quant="
                             f"{c.double_quant} (nested blocksize {fmt.NESTED_BLOCKSIZE})")
        layer.bnb_states[s] = state

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        c = self.config
        if c.on_the_fly:
            blobs = [fmt.quantize_4bit(w, c.quant_type, c.blocksize, c.double_quant)
                     for w in layer.weight.data.split(layer.output_sizes)]
        else:
            blobs = self._checkpoint_blobs(layer)
        n, k = layer.output_size, layer.input_size
        for name in ("weight", "weight_quant_map", "weight_nested_absmax", "weight_nested_quant_map",
                     f"weight_quant_state_bitsandbytes__{c.quant_type}"):
            replace_param(layer, name, None)
        replace_param(layer, "weight_packed", torch.cat([b.packed.reshape(-1) for b in blobs]).view(n, k // 2))
        replace_param(layer, "weight_absmax", torch.cat([b.absmax for b in blobs]).view(n, k // c.blocksize))
        layer.bnb_shard_blocks = tuple(b.absmax.numel() for b in blobs)
        if c.double_quant:
            replace_param(layer, "weight_nested_code", blobs[0].nested_code.clone())
            replace_param(layer, "weight_nested_absmax", torch.cat([b.nested_absmax for b in blobs]))
            replace_param(layer, "weight_nested_offset", torch.cat(
                [torch.full_like(b.nested_absmax, b.offset) for b in blobs]))
        self.kernels = select_kernels(layer, self, "nf4")

    def _checkpoint_blobs(self, layer: nn.Module) -> list[fmt.Blob4]:
        c, k = self.config, layer.input_size
        parts = {name: getattr(layer, name).data.split(sizes) for name, sizes in layer.bnb_segments.items()}
        blobs = []
        for s, rows in enumerate(layer.output_sizes):
            where = f"layer {layer.prefix} ({layer.checkpoint_prefixes[s]}.weight)"
            if not torch.equal(parts["weight_quant_map"][s], fmt.code4(c.quant_type, layer.weight.device)):
                raise ValueError(f"{where}: quant_map is not the standard {c.quant_type} table")
            blob = fmt.Blob4(parts["weight"][s].reshape(-1), parts["weight_absmax"][s], (rows, k), c.quant_type,
                             c.blocksize)
            if layer.bnb_states[s] is None:
                raise ValueError(f"{where}: no quant_state was loaded (dummy weights cannot stand in for it)")
            if c.double_quant:
                blob.nested_absmax = parts["weight_nested_absmax"][s]
                blob.nested_code = parts["weight_nested_quant_map"][s]
                blob.offset = float(layer.bnb_states[s]["nested_offset"])
                if not torch.equal(blob.nested_code, parts["weight_nested_quant_map"][0]):
                    raise ValueError(f"{where}: nested_quant_map differs from the other shards' of this layer")
            blobs.append(blob)
        del layer.bnb_states, layer.bnb_segments
        return blobs

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernels.apply(layer, x, bias)

    def reference_apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, dequantize_layer(layer, self.config, x.dtype), bias)


def _load_segment(sizes: list[int], param: nn.Parameter, loaded: torch.Tensor, shard: int | None) -> None:
    """Model format: each shard's checkpoint tensor fills its own segment of dim 0 (shards concatenated)."""
    s = shard or 0
    copy_checked(param.data.narrow(0, sum(sizes[:s]), sizes[s]), loaded)


def group_index(layer: nn.Module) -> torch.Tensor:
    """int64 [N*K/B]: the nested group of each absmax block (see the module docstring)."""
    device, out, start = layer.weight_absmax.device, [], 0
    for nb in layer.bnb_shard_blocks:
        out.append(torch.arange(nb, device=device) // fmt.NESTED_BLOCKSIZE + start)
        start += math.ceil(nb / fmt.NESTED_BLOCKSIZE)
    return torch.cat(out)


def resolved_absmax(layer: nn.Module, config: BitsAndBytesConfig) -> torch.Tensor:
    """float32 [N, K/B]: each block's absmax, through both levels with double quant."""
    absmax = layer.weight_absmax
    if config.double_quant:
        g = group_index(layer).view(absmax.shape)
        absmax = fmt.resolve_absmax(absmax, layer.weight_nested_code, layer.weight_nested_absmax[g],
                                    layer.weight_nested_offset[g])
    return absmax


def dequantize_layer(layer: nn.Module, config: BitsAndBytesConfig, dtype: torch.dtype) -> torch.Tensor:
    """Kernel format -> W [N, K] in `dtype`, equal to bitsandbytes.functional.dequantize_4bit per shard."""
    n, k = layer.output_size, layer.input_size
    w = fmt.dequantize_flat(layer.weight_packed, resolved_absmax(layer, config), config.quant_type,
                            config.blocksize, n * k, dtype)
    return w.view(n, k)
