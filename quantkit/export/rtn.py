"""Round-to-nearest export of an unquantized checkpoint into any written format: the calibration-free
baseline (`quantkit quantize --method rtn`). Decoder Linears (2-D weights under model.layers.) are quantized;
embeddings, norms and lm_head are copied as they are, as AutoGPTQ/AutoAWQ/llm-compressor/bnb leave them."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from quantkit.checkpoint.hf import iterate_tensors
from quantkit.export import bnb, w8a8, wna16
from quantkit.export.writers import write_checkpoint
from quantkit.quant import bnb_format

FORMATS = ("gptq", "awq", "pack-quantized", "int8", "fp8", "nf4", "fp4")
WHOLE_GROUP_FORMATS = ("awq", "pack-quantized")  # their readers (and ours) reject a ragged last group


class Quantized(Protocol):
    def dequantize(self) -> torch.Tensor: ...


@dataclass
class Producer:
    """How one format quantizes a Linear's weight and lays it out, and the config it writes."""
    quantize: Callable[[torch.Tensor], Quantized]
    tensors: Callable[[Quantized], dict[str, torch.Tensor]]
    config: dict[str, Any]
    extra_json: dict[str, dict] = field(default_factory=dict)


def producer(fmt: str, bits: int, group_size: int, sym: bool, desc_act: bool, seed: int,
             dtype: torch.dtype) -> Producer:
    """desc_act (gptq, pack-quantized): RTN has no Hessian to order columns by, so act-order uses one random
    permutation per input width (merged q/k/v and gate/up share theirs, as the loaders require)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (known: {FORMATS})")
    if desc_act and fmt not in ("gptq", "pack-quantized"):
        raise ValueError(f"desc_act applies to gptq and pack-quantized, not {fmt!r}")
    perms: dict[int, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)

    def perm(k: int) -> torch.Tensor | None:
        if desc_act and k not in perms:
            perms[k] = torch.randperm(k, generator=gen)
        return perms.get(k)

    if fmt == "gptq":
        cfg = wna16.gptq_config(bits, group_size, sym, desc_act)
        return Producer(lambda w: wna16.rtn_quantize(w, bits, group_size, sym, perm(w.shape[1]), min_zero=1),
                        wna16.gptq_tensors, cfg, {"quantize_config.json": cfg})
    if fmt == "awq":
        return Producer(lambda w: wna16.rtn_quantize(w, 4, group_size, sym), wna16.awq_tensors,
                        wna16.awq_config(group_size))
    if fmt == "pack-quantized":
        return Producer(lambda w: wna16.rtn_quantize(w, bits, group_size, sym, perm(w.shape[1])),
                        lambda q: wna16.pack_quantized_tensors(q, sym),
                        wna16.pack_quantized_config(bits, group_size, sym, desc_act))
    if fmt in w8a8.W8_TYPES:
        qtype = w8a8.W8_TYPES[fmt]
        return Producer(lambda w: w8a8.w8_quantize(w, qtype), w8a8.W8Weights.tensors, w8a8.w8a8_config(qtype))
    return Producer(lambda w: bnb_format.quantize_4bit(w, fmt, 64, double_quant=True),
                    lambda blob: bnb.bnb_tensors(blob, dtype),
                    bnb.bnb_config(fmt, True, str(dtype).removeprefix("torch.")))


def is_decoder_linear(name: str, tensor: torch.Tensor) -> bool:
    return name.startswith("model.layers.") and name.endswith(".weight") and tensor.dim() == 2


def quantize_model_rtn(model_dir: Path | str, out_dir: Path | str, fmt: str, bits: int = 4, group_size: int = 64,
                       sym: bool = True, desc_act: bool = False, seed: int = 0,
                       overwrite: bool = False) -> dict[str, Quantized]:
    """RTN-quantizes model_dir's decoder Linears into `fmt` (see FORMATS; awq and nf4/fp4 are 4-bit, int8/fp8
    8-bit per channel, whatever `bits` says) and writes out_dir. Returns module name -> what was written
    (each with .dequantize() -> float32 [N, K]), the oracle for readers."""
    tensors: dict[str, torch.Tensor] = {}
    written: dict[str, Quantized] = {}
    prod = None
    for _, name, tensor in iterate_tensors(Path(model_dir)):
        if not is_decoder_linear(name, tensor):
            tensors[name] = tensor
            continue
        prod = prod or producer(fmt, bits, group_size, sym, desc_act, seed, tensor.dtype)
        if fmt in WHOLE_GROUP_FORMATS and group_size != -1 and tensor.shape[1] % group_size:
            raise ValueError(f"{name}: in_features {tensor.shape[1]} is not divisible by group_size {group_size}; "
                             f"the {fmt} format needs whole groups (try group_size 64)")
        module = name.removesuffix(".weight")
        written[module] = prod.quantize(tensor)
        tensors.update({f"{module}.{k}": v for k, v in prod.tensors(written[module]).items()})
    if prod is None:
        raise ValueError(f"{model_dir}: no decoder Linear weights (model.layers.*.weight, 2-D) to quantize")
    write_checkpoint(model_dir, out_dir, tensors, prod.config, prod.extra_json, overwrite)
    return written
