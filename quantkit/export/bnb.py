"""Producer side of bitsandbytes 4-bit checkpoints (FORMATS.md §5) as transformers serializes a Linear4bit:
the packed weight plus its QuantState.as_dict(packed=True) entries next to it, and BitsAndBytesConfig."""
from __future__ import annotations

import json
from typing import Any

import torch

from quantkit.quant import bnb_format as fmt


def bnb_tensors(blob: fmt.Blob4, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Suffixes under the module prefix: weight [ceil(n/2), 1] uint8, weight.absmax, weight.quant_map and,
    with double quant, weight.nested_absmax / weight.nested_quant_map (cloned: safetensors drops shared
    tensors), and weight.quant_state.bitsandbytes__<type> (the non-tensor fields as UTF-8 JSON bytes).
    dtype: the original weight dtype, which dequantize_4bit returns."""
    state: dict[str, Any] = {"quant_type": blob.quant_type, "blocksize": blob.blocksize,
                             "dtype": str(dtype).removeprefix("torch."), "shape": list(blob.shape)}
    out = {"weight": blob.packed.reshape(-1, 1), "weight.absmax": blob.absmax,
           "weight.quant_map": fmt.code4(blob.quant_type).clone()}
    if blob.double_quant:
        state.update(nested_blocksize=fmt.NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=blob.offset)
        out.update({"weight.nested_absmax": blob.nested_absmax, "weight.nested_quant_map": blob.nested_code.clone()})
    raw = json.dumps(state).encode("utf-8")  # bitsandbytes.utils.pack_dict_to_tensor
    out[f"weight.quant_state.bitsandbytes__{blob.quant_type}"] = torch.tensor(list(raw), dtype=torch.uint8)
    return out


def bnb_config(quant_type: str, double_quant: bool, compute_dtype: str) -> dict[str, Any]:
    """transformers' BitsAndBytesConfig.to_dict() for load_in_4bit (lm_head skipped by default)."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "_load_in_4bit": True,
            "_load_in_8bit": False, "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False}
