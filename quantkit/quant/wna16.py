"""W{2,3,4,8}A16 weight-only integer quantization: the one kernel format that GPTQ, AWQ, RTN and
compressed-tensors pack-quantized layers all convert into, its torch reference matmul, the shared config checks,
and the compressed-tensors pack-quantized method.

Kernel format (parameters of the Linear after `process_weights_after_loading`; K = in_features, N =
out_features, b = bits, G = group size (K for per-channel), NG = ceil(K / G)):

  qweight  int32 [ceil(K*b/32), N]  unsigned codes q in [0, 2^b), packed along K as a dense LSB-first bit
                                    stream (primitives.pack: for b | 32, word [r, n] holds rows r*32/b + j at
                                    bits [b*j, b*j + b)); exactly the GPTQ qweight layout.
  qzeros   int32 [NG, ceil(N*b/32)] the true zero codes z (no GPTQ v1 "-1"), packed the same way along N;
                                    exactly the GPTQ v2 qzeros layout. Symmetric layers hold z = 2^(b-1).
  scales   activation dtype [NG, N] dequant multipliers.
  perm     int32 [K] (act-order layers only): qweight row k holds input channel perm[k], with perm =
           argsort(g_idx) so that groups are contiguous: row k belongs to group k // G.

  W[k, n] = scales[k // G, n] * (q[k, n] - z[k // G, n]);   y = x[..., perm] @ W  (+ bias)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from math import gcd
from typing import Any

import torch
from torch import nn

from quantkit.kernels.select import select_kernels
from quantkit.quant.base import QuantMethod, new_param, replace_param
from quantkit.quant.primitives import SUPPORTED_BITS, pack, packed_size, unpack

GROUP_SIZE_HINTS = (128, 64, 32)


def dequantize_kernel_weights(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int,
                              group_size: int, in_features: int) -> torch.Tensor:
    """The kernel format's weight as float32 [K, N] (rows in perm order); the oracle every kernel matches."""
    ng, n = scales.shape
    g = -(-in_features // ng) if group_size == -1 else group_size
    codes = unpack(qweight, bits, in_features, dim=0)
    if ng * g != in_features:  # a ragged last group
        codes = torch.nn.functional.pad(codes, (0, 0, 0, ng * g - in_features))
    codes = codes.view(ng, g, n)
    zeros = unpack(qzeros, bits, n, dim=1).float()
    w = (codes.float() - zeros[:, None]) * scales.float()[:, None]
    return w.view(ng * g, n)[:in_features]


@dataclass
class LinearSpec:
    """What a config needs to know of one Linear before the model exists (duck-types layers.linear.Linear)."""
    prefix: str
    input_size: int
    output_sizes: list[int]
    checkpoint_prefixes: list[str] = field(default_factory=list)


def llama_linear_specs(model_config: Any) -> list[LinearSpec]:
    """Every Linear of a Llama-family decoder (models/llama.py's names, merged qkv / gate_up included)."""
    c = model_config
    q, kv, h, inter = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.hidden_size, \
        c.intermediate_size
    specs = []
    for i in range(c.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        specs += [LinearSpec(f"{a}.qkv_proj", h, [q, kv, kv], [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"]),
                  LinearSpec(f"{a}.o_proj", q, [h], [f"{a}.o_proj"]),
                  LinearSpec(f"{m}.gate_up_proj", h, [inter, inter], [f"{m}.gate_proj", f"{m}.up_proj"]),
                  LinearSpec(f"{m}.down_proj", inter, [h], [f"{m}.down_proj"])]
    return specs + [LinearSpec("lm_head", h, [c.vocab_size], ["lm_head"])]


def verify_linears(config: Any, model_config: Any) -> None:
    """Runs each WNA16 method's shape checks over every Linear the model will have; one ValueError lists the
    problems, with layer indices folded to '*' ('model.layers.*.self_attn.qkv_proj: ...')."""
    problems: list[str] = []
    for spec in llama_linear_specs(model_config):
        method = config.get_method(spec, spec.prefix)
        if isinstance(method, WNA16Method):
            for p in method.check(spec):
                p = re.sub(r"layers\.\d+\.", "layers.*.", p)
                if p not in problems:
                    problems.append(p)
    if problems:
        raise ValueError(f"{config.name} cannot quantize this model: " + "; ".join(problems))


def g_idx_param(input_size: int, num_shards: int) -> nn.Parameter:
    """g_idx [num_shards, K]: every merged shard's checkpoint g_idx is kept, to check that they agree."""
    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None) -> None:
        if loaded.dtype.is_floating_point or tuple(loaded.shape) != (input_size,):
            raise ValueError(f"g_idx must be an integer tensor of shape ({input_size},), got "
                             f"{loaded.dtype} {tuple(loaded.shape)}")
        param.data[shard_id or 0].copy_(loaded)
    return new_param((num_shards, input_size), torch.int32, per_shard=True, weight_loader=load)


def merged_g_idx(layer: nn.Module, g_idx: torch.Tensor) -> torch.Tensor:
    """The one g_idx [K] of a layer whose merged shards must have loaded identical ones."""
    for i in range(1, g_idx.shape[0]):
        if not torch.equal(g_idx[i], g_idx[0]):
            raise ValueError(f"layer {layer.prefix}: g_idx of {layer.checkpoint_prefixes[i]} differs from "
                             f"{layer.checkpoint_prefixes[0]}; merged modules must share their act-order")
    return g_idx[0]


class WNA16Method(QuantMethod):
    """Base of the weight-only integer methods: subclasses create and load their checkpoint format, then call
    `set_kernel_format`; apply() is shared. Class flags choose the shape rules `check` enforces."""
    full_groups = False    # K % G must be 0 (else a ragged last group is allowed)
    k_words_exact = False  # K*b % 32 must be 0 (checkpoint packs along K into exact words)
    n_words_exact = True   # every output shard's N_i*b % 32 must be 0 (something packs along N)

    def __init__(self, bits: int, group_size: int) -> None:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"{bits}-bit weights are not supported (supported: {SUPPORTED_BITS})")
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"group_size must be -1 (per channel) or > 0, got {group_size}")
        self.bits, self.group_size = bits, group_size
        self.pack_factor = Fraction(32, bits)  # values per int32 word; a Fraction for 3-bit (32/3)

    def groups(self, input_size: int) -> tuple[int, int]:
        """(G, NG): the effective group size and the number of groups along K."""
        g = input_size if self.group_size == -1 else self.group_size
        return g, -(-input_size // g)

    def check(self, spec: LinearSpec) -> list[str]:
        """Problems with quantizing `spec` this way (empty when fine)."""
        k, problems = spec.input_size, []
        g, _ = self.groups(k)
        if self.full_groups and k % g:
            hint = next((h for h in GROUP_SIZE_HINTS if k % h == 0), None)
            problems.append(f"{spec.prefix}: in_features {k} not divisible by group_size {g}"
                            + (f" (use group_size {hint})" if hint else ""))
        if self.k_words_exact and k * self.bits % 32:
            problems.append(f"{spec.prefix}: in_features {k} does not fill whole int32 words at {self.bits} bits")
        if self.n_words_exact:
            for name, n in zip(spec.checkpoint_prefixes, spec.output_sizes):
                if n * self.bits % 32:
                    problems.append(f"{name}: out_features {n} does not fill whole int32 words at {self.bits} "
                                    f"bits (needs a multiple of {32 // gcd(32, self.bits)})")
        return problems

    def set_kernel_format(self, layer: nn.Module, qweight: torch.Tensor, zeros: torch.Tensor,
                          scales: torch.Tensor, g_idx: torch.Tensor | None, dtype: torch.dtype) -> None:
        """qweight int32 [ceil(K*b/32), N] packed along K in original K order; zeros int [NG, N] true zero
        codes; scales float [NG, N]; g_idx int [K] or None. Registers qweight/qzeros/scales/perm."""
        k = layer.input_size
        g, _ = self.groups(k)
        perm = None
        if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k, device=g_idx.device) // g):
            perm = torch.argsort(g_idx.long(), stable=True)
            if not torch.equal(g_idx.long()[perm], torch.arange(k, device=g_idx.device) // g):
                raise ValueError(f"layer {layer.prefix}: g_idx does not assign {g} input channels to each group "
                                 f"(group_size {self.group_size}); it cannot come from this config")
            qweight = pack(unpack(qweight, self.bits, k, dim=0)[perm], self.bits, dim=0)
            perm = perm.to(torch.int32)
        replace_param(layer, "qweight", qweight.contiguous())
        replace_param(layer, "qzeros", pack(zeros, self.bits, dim=1))
        replace_param(layer, "scales", scales.to(dtype).contiguous())
        replace_param(layer, "perm", perm)
        if perm is None:
            layer.perm = None  # a plain attribute: apply() reads it either way
        self.kernels = select_kernels(layer, self, "wna16")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernels.apply(layer, x, bias)

    def input_permutation(self, layer: nn.Module) -> torch.Tensor | None:
        return layer.perm

    def drop_input_permutation(self, layer: nn.Module) -> None:
        replace_param(layer, "perm", None)
        layer.perm = None  # the kernels read it per call: nothing to select again

    def permute_outputs(self, layer: nn.Module, order: torch.Tensor) -> bool:
        n = layer.output_size
        replace_param(layer, "qweight", layer.qweight[:, order].contiguous())
        replace_param(layer, "qzeros", pack(unpack(layer.qzeros, self.bits, n, dim=1)[:, order], self.bits, dim=1))
        replace_param(layer, "scales", layer.scales[:, order].contiguous())
        self.kernels = select_kernels(layer, self, "wna16")
        return True

    def reference_apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Torch reference: dequantize to float32 [K, N] and matmul in float32; output in x's dtype."""
        w = dequantize_kernel_weights(layer.qweight, layer.qzeros, layer.scales, self.bits,
                                      self.groups(layer.input_size)[0], layer.input_size)
        if layer.perm is not None:
            x = x.index_select(-1, layer.perm)
        out = x.float() @ w
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)


class PackQuantizedMethod(WNA16Method):
    """compressed-tensors pack-quantized (FORMATS.md §3): weight_packed int32 [N, ceil(K*b/32)] offset-binary
    codes packed along K; weight_scale [N, NG]; weight_zero_point int32 [ceil(N*b/32), NG] packed along N
    (asym only); weight_shape int [2] = [N, K]; weight_g_idx int32 [K] when actorder is 'group'. Like
    compressed-tensors itself, K must be a multiple of the group size."""
    full_groups = True

    def __init__(self, num_bits: int, group_size: int | None, symmetric: bool, actorder: str | None,
                 strategy: str) -> None:
        if strategy not in ("group", "channel"):
            raise ValueError(f"pack-quantized weights with strategy {strategy!r} are not supported "
                             "(supported: group, channel)")
        if strategy == "group" and (group_size is None or group_size <= 0):
            raise ValueError(f"strategy 'group' needs a positive group_size, got {group_size}")
        if actorder not in (None, "group", "dynamic", "weight", "static"):
            raise ValueError(f"actorder {actorder!r} is not supported (group, weight or null)")
        super().__init__(num_bits, group_size if strategy == "group" else -1)
        self.symmetric = symmetric
        self.has_g_idx = actorder in ("group", "dynamic")
        self.n_words_exact = not symmetric

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        n, (_, ng) = sum(output_sizes), self.groups(input_size)
        layer.weight_packed = new_param((n, packed_size(input_size, self.bits)), torch.int32, output_dim=0,
                                        input_dim=1, packed_dim=1, pack_factor=self.pack_factor)
        layer.weight_scale = new_param((n, ng), params_dtype, output_dim=0, input_dim=1)
        if not self.symmetric:
            layer.weight_zero_point = new_param((packed_size(n, self.bits), ng), torch.int32, output_dim=0,
                                                packed_dim=0, pack_factor=self.pack_factor)
        layer.weight_shape = new_param((len(output_sizes), 2), torch.int64, per_shard=True,
                                       weight_loader=_shape_loader)
        if self.has_g_idx:
            layer.weight_g_idx = g_idx_param(input_size, len(output_sizes))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        k, n = layer.input_size, layer.output_size
        for i, (name, n_i) in enumerate(zip(layer.checkpoint_prefixes, layer.output_sizes)):
            if layer.weight_shape[i].tolist() != [n_i, k]:
                raise ValueError(f"{name}.weight_shape is {layer.weight_shape[i].tolist()}, expected [{n_i}, {k}]")
        codes = unpack(layer.weight_packed.data, self.bits, k, dim=1)  # [N, K]
        if self.symmetric:
            zeros = torch.full_like(layer.weight_scale, 2 ** (self.bits - 1), dtype=torch.int32).t()
        else:
            zeros = unpack(layer.weight_zero_point.data, self.bits, n, dim=0).t()
        g_idx = merged_g_idx(layer, layer.weight_g_idx.data) if self.has_g_idx else None
        dtype = layer.weight_scale.dtype
        self.set_kernel_format(layer, pack(codes.t(), self.bits, dim=0), zeros, layer.weight_scale.data.t(),
                               g_idx, dtype)
        for name in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"):
            replace_param(layer, name, None)


def _shape_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None) -> None:
    if loaded.dtype.is_floating_point or loaded.numel() != 2:
        raise ValueError(f"weight_shape must be 2 integers, got {loaded.dtype} {tuple(loaded.shape)}")
    param.data[shard_id or 0].copy_(loaded.reshape(2))
