"""Producer side of the weight-only integer formats (FORMATS.md §1-3): one Linear quantized with GPTQ's
min/max quantizer (`IntWeights`), laid out as GPTQ v1/v2, AutoAWQ GEMM or compressed-tensors pack-quantized
tensors, plus each producer's `quantization_config`. Packing is quant.primitives' (the loaders' inverse).

Pitfall 2 (v1 cannot store z = 0): real producers write z-1 and let z = 0 wrap (AutoGPTQ ORs a -1 into the
word, GPTQModel subtracts 0x11111111 and borrows from the next field), which word-level and field-level
readers decode differently. We never write such a field: `rtn_quantize(..., min_zero=1)` moves an asym group
whose zero would be 0 to z = 1 with scale * maxq / (maxq - 1), which still covers the group's range, so every
stored z-1 lies in [0, 2^b - 2] and the words read the same whether a reader adds 1 per field with a mask
((stored + 1) & mask, our loader and vLLM) or per word (+0x11111111, GPTQModel's v1 -> v2). `gptq_tensors`
refuses zeros of 0 for v1 rather than writing an ambiguous word."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quantkit.export.writers import compressed_tensors_config
from quantkit.quant.primitives import awq_interleave, minmax_qparams, pack, quantize


@dataclass
class IntWeights:
    """One Linear [N, K]: codes int32 [N, K] in [0, 2^b), scales [N, NG] (storage dtype), zeros int32 [N, NG]
    true zero codes, g_idx int32 [K] (group of each input channel) for act-order, else None."""
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None

    def group_index(self) -> torch.Tensor:
        """int32 [K]: g_idx, or k // G without act-order."""
        if self.g_idx is not None:
            return self.g_idx
        k = self.codes.shape[1]
        return (torch.arange(k) // (k if self.group_size == -1 else self.group_size)).int()

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] = scales * (codes - zeros) per input channel's group: what every reader must get."""
        g = self.group_index().long()
        return (self.codes - self.zeros[:, g]).float() * self.scales.float()[:, g]


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool, perm: torch.Tensor | None = None,
                 min_zero: int = 0) -> IntWeights:
    """Round-to-nearest with the GPTQ quantizer; scales are rounded to weight.dtype before the codes are
    computed, so the stored scales are the ones the codes were rounded against. perm (act-order): columns are
    grouped in perm order, codes stay in original order and g_idx[k] = position of k in perm // G.
    min_zero: see the module docstring (1 for GPTQ v1 asym)."""
    w = weight.float() if perm is None else weight.float()[:, perm]
    scales, zeros = minmax_qparams(w, bits, group_size, sym)
    if min_zero:
        maxq = 2 ** bits - 1
        scales = torch.where(zeros < min_zero, scales * maxq / (maxq - min_zero), scales)
        zeros = zeros.clamp(min=min_zero)
    scales = scales.to(weight.dtype)
    codes = quantize(w, scales.float(), zeros, bits, group_size)
    if perm is None:
        return IntWeights(codes, scales, zeros, bits, group_size)
    inv = torch.argsort(perm)
    g = w.shape[1] if group_size == -1 else group_size
    return IntWeights(codes[:, inv].contiguous(), scales, zeros, bits, group_size, (inv // g).int())


def gptq_tensors(q: IntWeights, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """qweight [K*b/32, N] packed along K, qzeros [NG, N*b/32] packed along N (v1: z-1), scales [NG, N],
    g_idx [K] (GPTQModel always writes it)."""
    stored = q.zeros - 1 if checkpoint_format == "gptq" else q.zeros
    if bool((stored < 0).any()):
        raise ValueError("GPTQ v1 cannot store a zero point of 0 (FORMATS.md Pitfall 2): quantize with "
                         "min_zero=1 or write checkpoint_format='gptq_v2'")
    return {"qweight": pack(q.codes.t(), q.bits, dim=0), "qzeros": pack(stored.t(), q.bits, dim=1),
            "scales": q.scales.t().contiguous(), "g_idx": q.group_index()}


def gptq_config(bits: int, group_size: int, sym: bool, desc_act: bool,
                checkpoint_format: str = "gptq") -> dict[str, Any]:
    """GPTQModel's v1 save: config.json quantization_config, also written as quantize_config.json."""
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
            "lm_head": False, "damp_percent": 0.05, "true_sequential": True, "static_groups": False,
            "checkpoint_format": checkpoint_format, "format": checkpoint_format, "pack_dtype": "int32",
            "meta": {"quantizer": ["quantkit:rtn"]}}


def awq_tensors(q: IntWeights) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM: qweight [K, N/8] and qzeros [NG, N/8] packed along N in the AWQ nibble order,
    scales [NG, N]; zeros stored as they are."""
    if q.bits != 4 or q.g_idx is not None:
        raise ValueError("AWQ GEMM stores 4-bit weights without act-order")
    return {"qweight": pack(awq_interleave(q.codes.t()), 4, dim=1),
            "qzeros": pack(awq_interleave(q.zeros.t()), 4, dim=1), "scales": q.scales.t().contiguous()}


def awq_config(group_size: int, modules_to_not_convert: list[str] | None = None) -> dict[str, Any]:
    return {"quant_method": "awq", "zero_point": True, "group_size": group_size, "bits": 4, "version": "gemm",
            "modules_to_not_convert": modules_to_not_convert}


def pack_quantized_tensors(q: IntWeights, sym: bool) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized: offset-binary codes (= our unsigned codes) packed along K, scales
    [N, NG], zero points packed along N (asym only), weight_shape [N, K], weight_g_idx with act-order."""
    out = {"weight_packed": pack(q.codes, q.bits, dim=1), "weight_scale": q.scales.contiguous(),
           "weight_shape": torch.tensor(q.codes.shape, dtype=torch.int64)}
    if not sym:
        out["weight_zero_point"] = pack(q.zeros, q.bits, dim=0)
    if q.g_idx is not None:
        out["weight_g_idx"] = q.g_idx
    return out


def pack_quantized_config(bits: int, group_size: int, sym: bool, act_order: bool) -> dict[str, Any]:
    """llm-compressor's W4A16 / W4A16_ASYM presets (group strategy; -1 = channel)."""
    weights = {"num_bits": bits, "symmetric": sym, "actorder": "group" if act_order else None,
               "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else group_size}
    return compressed_tensors_config("pack-quantized", weights)
