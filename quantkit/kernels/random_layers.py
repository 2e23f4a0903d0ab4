"""Layers in each kernel format filled with random content on any device, without a checkpoint: the inputs of
the kernel tests (tests/kernels) and of the kernel benchmark (benchmarks/linear_kernels.py)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from quantkit.layers.linear import Linear
from quantkit.quant.base import replace_param
from quantkit.quant.gptq import RTNConfig
from quantkit.quant.nf4 import BitsAndBytesConfig
from quantkit.quant.primitives import pack
from quantkit.quant.w8a8 import FP8, INT8, W8A8LinearMethod, W8A8Scheme


def _fixed(method):
    return SimpleNamespace(get_method=lambda layer, prefix: method)


def wna16_layer(k: int, n: int, bits: int, group: int, sym: bool, act_order: bool, dtype: torch.dtype,
                bias: bool, gen: torch.Generator, device: torch.device, scale: float = 0.02) -> Linear:
    """A Linear in the WNA16 kernel format with random codes, zeros (2^(b-1) when sym) and scales; act-order
    layers get a random g_idx with G channels per group (stored permuted, as GPTQ's desc_act does)."""
    method = RTNConfig(bits, group, sym).get_method(None, "x")
    with torch.device(device):
        layer = Linear(k, [n], bias, dtype, _fixed(method), prefix="model.layers.0.mlp.down_proj")
    replace_param(layer, "weight", None)
    g, ng = method.groups(k)
    codes = torch.randint(0, 2 ** bits, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.full((ng, n), 2 ** (bits - 1), dtype=torch.int32) if sym else \
        torch.randint(0, 2 ** bits, (ng, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(ng, n, generator=gen) + 0.1) * scale
    g_idx = torch.arange(k) // g
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    method.set_kernel_format(layer, pack(codes, bits, dim=0).to(device), zeros.to(device), scales.to(device),
                             g_idx.to(device), dtype)
    if bias:
        layer.bias.data.copy_(torch.randn(n, generator=gen))
    return layer


def w8a8_layer(k: int, n: int, fp8: bool, static: bool, dtype: torch.dtype, bias: bool,
               gen: torch.Generator, device: torch.device) -> Linear:
    """W8A8 from 16-bit weights quantized per channel (dynamic activations), or a per-tensor checkpoint with two
    shards and a static input scale."""
    qtype = FP8 if fp8 else INT8
    scheme = W8A8Scheme(qtype, "tensor", static_input=True) if static else W8A8Scheme(qtype, on_the_fly=True)
    method = W8A8LinearMethod(scheme)
    sizes = [n // 2, n - n // 2] if static else [n]
    with torch.device(device):
        layer = Linear(k, sizes, bias, dtype, _fixed(method), prefix="model.layers.0.self_attn.qkv_proj",
                       shard_names=["q_proj", "k_proj"][:len(sizes)])
    w = torch.randn(n, k, generator=gen) * 0.05
    if static:
        layer.weight.data.copy_(qtype.quantize(w * 40, torch.tensor(1.0)).to(device))
        layer.weight_scale.data.copy_(torch.rand(len(sizes), generator=gen) * 0.01 + 0.001)
        layer.input_scale.data.copy_(torch.rand(len(sizes), generator=gen) * 0.02 + 0.01)
    else:
        layer.weight.data.copy_(w)
    if bias:
        layer.bias.data.copy_(torch.randn(n, generator=gen))
    method.process_weights_after_loading(layer)
    return layer


def nf4_layer(k: int, sizes: list[int], quant_type: str, double_quant: bool, dtype: torch.dtype, bias: bool,
              gen: torch.Generator, device: torch.device) -> Linear:
    """bitsandbytes 4-bit on the fly (merged shards: the nested groups restart in every shard)."""
    config = BitsAndBytesConfig(quant_type=quant_type, double_quant=double_quant, on_the_fly=True)
    with torch.device(device):
        layer = Linear(k, sizes, bias, dtype, config, prefix="model.layers.0.mlp.gate_up_proj",
                       shard_names=["gate_proj", "up_proj", "x_proj"][:len(sizes)])
    layer.weight.data.copy_(torch.randn(sum(sizes), k, generator=gen) * 0.05)
    if bias:
        layer.bias.data.copy_(torch.randn(sum(sizes), generator=gen))
    layer.quant_method.process_weights_after_loading(layer)
    return layer
