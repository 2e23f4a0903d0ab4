"""W8A8 linear method shared by `fp8`, `int8` and compressed-tensors: 8-bit weights (FP8 E4M3FN or INT8) with
8-bit activations quantized per token at run time (or with one static scale).

Kernel format, per Linear, after `process_weights_after_loading`:
  weight        [N, K] float8_e4m3fn | int8, row-major; `weight.t()` is then the column-major [K, N] operand that
                `torch._scaled_mm(x_q, weight.t(), ...)` expects, so a GPU kernel needs no repack.
  weight_scale  [N, 1] fp32 dequant multiplier per output channel (per-tensor and per-shard scales are expanded to it
                after the max/requantize step), or [N, ceil(K/bk)] fp32 for block FP8 (block scales repeated along
                N, which keeps merged shards whose N is not a multiple of bn exact).
  input_scale   0-dim fp32 when activations are static; absent when they are dynamic.

Dynamic per-token layers whose kernels all accept it set `input_quant` (the W8Type): the op before them (RMSNorm,
SiLU-and-mul) then hands over a QuantizedActivation, quantized as `quantize_dynamic` would, instead of floats, but
for the calls whose kernel quantizes float rows itself at no cost (one row: `input_quant_for`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.kernels.select import select_kernels
from quantkit.quant.base import QuantMethod, new_param, replace_param

logger = logging.getLogger(__name__)
_FP8_TABLES: dict[torch.device, torch.Tensor] = {}
_WEIGHT_ONLY_NOTICED: set[torch.device] = set()
_MIN_SCALE = 1e-12  # dynamic scales are clamped here, so an all-zero row quantizes to zeros and never divides by 0


@dataclass(frozen=True)
class W8Type:
    """An 8-bit code: FP8 E4M3FN saturates at +-448; INT8 rounds half-to-even and clamps to [-128, 127] (the
    compressed-tensors and vLLM range). Dynamic scales are amax/qmax, with qmax 127 for INT8 as in vLLM's
    `scaled_int8_quant` (compressed-tensors' own fake-quant uses 127.5), so dynamic codes stay in [-127, 127]."""
    dtype: torch.dtype
    qmax: float
    qmin: float

    @property
    def is_int(self) -> bool:
        return not self.dtype.is_floating_point

    def to_float(self, q: torch.Tensor) -> torch.Tensor:
        """Codes -> exact fp32 values. FP8 decodes through a 256-entry table: torch's CPU float8 cast is ~5x
        slower than the gather, and this runs on every call of the reference matmul."""
        if self.is_int:
            return q.float()
        table = _FP8_TABLES.get(q.device)
        if table is None:
            table = _FP8_TABLES[q.device] = torch.arange(256, dtype=torch.uint8, device=q.device).view(
                self.dtype).float()
        return table.index_select(0, q.view(torch.uint8).flatten().int()).view(q.shape)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """fp32 `x` / `scale` (broadcast) -> codes of `self.dtype`, saturating."""
        y = x / scale
        if self.is_int:
            y = y.round()
        return y.clamp(self.qmin, self.qmax).to(self.dtype)


FP8 = W8Type(torch.float8_e4m3fn, 448.0, -448.0)
INT8 = W8Type(torch.int8, 127.0, -128.0)


@dataclass(frozen=True, eq=False)
class QuantizedActivation:
    """An activation already quantized per token, handed by a fused op (RMSNorm, SiLU-and-mul) to the next W8A8
    Linear in place of the float tensor, so the Linear skips its own activation-quant pass. q [..., K] codes and
    scale [..., 1] fp32 (x ~ q * scale) as `quantize_dynamic` makes them; dtype is the activation dtype it stands
    for, i.e. the Linear's output dtype. `shape`, `dtype` and `numel` read like the float tensor's, so kernel
    dispatch on M and output shapes need no special case."""
    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def numel(self) -> int:
        return self.q.numel()


def quantize_activation(x: torch.Tensor, qtype: W8Type) -> QuantizedActivation:
    """The torch reference of the fused ops' quant mode: x [..., K] quantized per token exactly as
    `W8A8LinearMethod.reference_apply` quantizes a float input."""
    q, scale = quantize_dynamic(x.reshape(-1, x.shape[-1]).float(), qtype)
    return QuantizedActivation(q.view(x.shape), scale.view(*x.shape[:-1], 1), x.dtype)


def expand_groups(scale: torch.Tensor, group: int, size: int, dim: int) -> torch.Tensor:
    """Repeat each scale `group` times along `dim` and cut to `size` (the last group may be partial)."""
    return scale.repeat_interleave(group, dim=dim).narrow(dim, 0, size)


def quantize_dynamic(x: torch.Tensor, qtype: W8Type, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (group=None) or per-token-group quantization of fp32 `x` [M, K].
    Returns codes [M, K] of qtype.dtype and fp32 scales [M, 1] (or [M, ceil(K/group)]), scale = amax/qmax."""
    if group is None:
        amax = x.abs().amax(dim=-1, keepdim=True)
    else:
        pad = -x.shape[-1] % group
        amax = F.pad(x.abs(), (0, pad)).unflatten(-1, (-1, group)).amax(dim=-1)
    # divided by a tensor, not the Python float: on CUDA torch multiplies by the float's reciprocal, which is not
    # amax / qmax rounded once, so scales (and codes at rounding ties) parted from the kernels' and the CPU's
    scale = (amax / torch.full_like(amax, qtype.qmax)).clamp(min=_MIN_SCALE)
    full = scale if group is None else expand_groups(scale, group, x.shape[-1], dim=-1)
    return qtype.quantize(x, full), scale


def quantize_weight(w: torch.Tensor, qtype: W8Type) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of `w` [N, K] -> (codes [N, K], fp32 scale [N, 1] = absmax/qmax)."""
    return quantize_dynamic(w.float(), qtype)


@dataclass(frozen=True)
class W8A8Scheme:
    """What a checkpoint holds for one layer and how the layer runs.
    weight_strategy: 'tensor' (one scale per shard), 'channel' ([N, 1]) or 'block' (scales [ceil(N/bn), ceil(K/bk)]
    per shard, named `scale_name`). static_input: an `input_scale` per shard (activations static, per tensor).
    on_the_fly: the checkpoint holds 16/32-bit weights, quantized per channel after loading. weight_only: 16/32-bit
    activations (no activation quantization). requantize_fused: per-tensor shard scales are merged by taking their
    max and requantizing the other shards (vLLM's FP8 rule); otherwise they are expanded per channel, exactly."""
    qtype: W8Type
    weight_strategy: str = "channel"
    static_input: bool = False
    on_the_fly: bool = False
    weight_only: bool = False
    block: tuple[int, int] | None = None
    scale_name: str = "weight_scale"
    requantize_fused: bool = True


class W8A8LinearMethod(QuantMethod):
    """One Linear's W8A8 weights: checkpoint format per `scheme` -> the kernel format in the module docstring."""

    def __init__(self, scheme: W8A8Scheme) -> None:
        self.scheme = scheme
        self.weight_only = scheme.weight_only
        self._kernels_take_codes = False  # set once the kernels are chosen

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        s, n = self.scheme, sum(output_sizes)
        layer.weight = new_param((n, input_size), params_dtype if s.on_the_fly else s.qtype.dtype,
                                 output_dim=0, input_dim=1)
        if s.on_the_fly:
            return
        if s.weight_strategy == "channel":
            setattr(layer, s.scale_name, new_param((n, 1), torch.float32, output_dim=0))
        elif s.weight_strategy == "tensor":
            setattr(layer, s.scale_name, _per_shard_scalars(layer, len(output_sizes)))
        else:
            bn, bk = s.block
            rows = sum(-(-size // bn) for size in output_sizes)
            setattr(layer, s.scale_name, new_param((rows, -(-input_size // bk)), torch.float32, per_shard=True,
                                                   weight_loader=_block_scale_loader(layer, bn)))
        if s.static_input:
            layer.input_scale = _per_shard_scalars(layer, len(output_sizes))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        s = self.scheme
        if s.on_the_fly:
            weight, scale = quantize_weight(layer.weight.data, s.qtype)
        else:
            raw = getattr(layer, s.scale_name).data
            _check_positive(raw, f"layer {layer.prefix}: {s.scale_name}")
            weight, scale = self._merge_scales(layer, raw)
        if s.scale_name != "weight_scale":
            replace_param(layer, s.scale_name, None)
        replace_param(layer, "weight", weight)
        replace_param(layer, "weight_scale", scale)
        if s.static_input:
            _check_positive(layer.input_scale.data, f"layer {layer.prefix}: input_scale")
            replace_param(layer, "input_scale", layer.input_scale.data.amax())  # vLLM: max over fused shards
        if not self.weight_only and s.qtype == FP8 and not _fp8_compute_supported(layer.weight.device):
            if layer.weight.device not in _WEIGHT_ONLY_NOTICED:
                _WEIGHT_ONLY_NOTICED.add(layer.weight.device)
                logger.warning("%s lacks FP8 compute (compute capability < 8.9): FP8 layers run weight-only "
                               "(weights dequantized per call, activations stay 16-bit)", layer.weight.device)
            self.weight_only = True
        self.kernels = select_kernels(layer, self, "w8a8")
        self._kernels_take_codes = all(k.accepts_quantized_input for k in self.kernels.kernels)

    @property
    def input_quant(self) -> W8Type | None:
        """The code type when activations are dynamic per token and the kernels take codes; read on every call,
        so switching a layer to weight_only afterwards switches the op before it back to float output."""
        s = self.scheme
        dynamic = not (self.weight_only or s.static_input or s.block is not None)
        return s.qtype if dynamic and self._kernels_take_codes else None

    def input_quant_for(self, tokens: int, dtype: torch.dtype) -> W8Type | None:
        """`input_quant`, except where the kernel serving `tokens` rows quantizes float rows inside its GEMM (one
        row): a producer's quantizing pass costs more there, as the row's amax is one more reduction over the whole
        row (H100, 8B: SiLU-and-mul quantizing one 14336-wide row 3.6 us on a thread-block cluster, 6.3 us in one
        Triton program, against 1.0 us without: fused_ops_silu_cluster_all_t_h100.json)."""
        return None if self.kernels.kernel_for(tokens).quantizes_inside(tokens, dtype) else self.input_quant

    def _merge_scales(self, layer: nn.Module, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Checkpoint scales -> (weight [N, K], kernel weight_scale)."""
        s, weight, sizes = self.scheme, layer.weight.data, layer.output_sizes
        if s.weight_strategy == "channel":
            return weight, raw
        if s.weight_strategy == "block":
            bn = s.block[0]
            blocks = raw.split([-(-size // bn) for size in sizes])
            return weight, torch.cat([expand_groups(b, bn, size, dim=0) for b, size in zip(blocks, sizes)])
        per_row = torch.cat([raw[i].expand(size) for i, size in enumerate(sizes)])[:, None]
        if not s.requantize_fused or len(sizes) == 1:
            return weight, per_row
        top = raw.amax()
        return s.qtype.quantize(s.qtype.to_float(weight) * per_row, top), top.expand(weight.shape[0], 1).clone()

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        """The kernel-format weight as fp32 [N, K]: codes x scales (block scales expanded along K)."""
        scale = layer.weight_scale
        if self.scheme.weight_strategy == "block":
            scale = expand_groups(scale, self.scheme.block[1], layer.input_size, dim=1)
        return self.scheme.qtype.to_float(layer.weight) * scale

    def apply(self, layer: nn.Module, x: torch.Tensor | QuantizedActivation,
              bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernels.apply(layer, x, bias)

    def reference_apply(self, layer: nn.Module, x: torch.Tensor | QuantizedActivation,
                        bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., K] (any float dtype, or a QuantizedActivation when `input_quant` is set) -> [..., N] in x.dtype.
        The CPU reference of the GPU path: activations quantized per token (or per token-group for block FP8, or
        with the static scale); FP8 dequantizes both operands and multiplies in fp32; INT8 accumulates integer
        products exactly, then scales."""
        bias32 = None if bias is None else bias.float()
        if isinstance(x, QuantizedActivation):
            y = self._codes_matmul(layer, *self.quantized_input(layer, x), bias32)
        elif self.weight_only:
            y = F.linear(x.reshape(-1, layer.input_size).float(), self.dequantized_weight(layer), bias32)
        else:
            y = self._quantized_matmul(layer, x.reshape(-1, layer.input_size).float(), bias32)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)

    def quantized_input(self, layer: nn.Module, x: QuantizedActivation) -> tuple[torch.Tensor, torch.Tensor]:
        """A pre-quantized activation as (codes [M, K], fp32 scales [M, 1]); an error unless it is what
        `input_quant` asked for."""
        if self.input_quant is None or x.q.dtype != self.input_quant.dtype or x.shape[-1] != layer.input_size:
            wants = f"{self.input_quant.dtype} codes" if self.input_quant else "float activations only"
            raise ValueError(f"layer {layer.prefix} was handed {x.q.dtype} codes of shape {tuple(x.shape)}; it "
                             f"takes {wants} with {layer.input_size} features")
        return x.q.reshape(-1, layer.input_size), x.scale.reshape(-1, 1)

    def _quantized_matmul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        s = self.scheme
        if s.static_input:
            x_scale = layer.input_scale
            x_q = s.qtype.quantize(x, x_scale)
        else:
            x_q, x_scale = quantize_dynamic(x, s.qtype, s.block[1] if s.block else None)
        return self._codes_matmul(layer, x_q, x_scale, bias)

    def _codes_matmul(self, layer: nn.Module, x_q: torch.Tensor, x_scale: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        """Activation codes [M, K] with their scales (per tensor, token or token-group) times the weight, fp32."""
        s = self.scheme
        if s.qtype.is_int:
            # Integer products summed exactly, then scaled: what an int32-accumulating kernel does. fp32 holds every
            # sum exactly while K * 128 * 128 <= 2^24 (K <= 1024); wider layers accumulate in float64.
            acc_dtype = torch.float32 if x_q.shape[-1] * 128 * 128 <= 2 ** 24 else torch.float64
            acc = F.linear(x_q.to(acc_dtype), layer.weight.to(acc_dtype)).double()
            y = (acc * x_scale.double() * layer.weight_scale.double().reshape(1, -1)).float()
            return y if bias is None else y + bias
        if s.block is not None:
            x_scale = expand_groups(x_scale, s.block[1], x_q.shape[-1], dim=-1)
        return F.linear(s.qtype.to_float(x_q) * x_scale, self.dequantized_weight(layer), bias)


def _per_shard_scalars(layer: nn.Module, shards: int) -> nn.Parameter:
    """One fp32 scalar per shard ([shards]); accepts a checkpoint scalar shaped [] or [1]."""
    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None) -> None:
        if loaded.numel() != 1:
            raise ValueError(f"layer {layer.prefix}: expected a per-tensor scale (shape [] or [1]), got shape "
                             f"{tuple(loaded.shape)}")
        _check_float(loaded, layer)
        param.data[shard_id or 0] = loaded.reshape(()).float()
    return new_param((shards,), torch.float32, per_shard=True, weight_loader=load)


def _block_scale_loader(layer: nn.Module, bn: int):
    """Places shard i's block scales [ceil(n_i/bn), ceil(K/bk)] at its own block rows."""
    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None) -> None:
        rows = [-(-size // bn) for size in layer.output_sizes]
        index = shard_id or 0
        target = param.data.narrow(0, sum(rows[:index]), rows[index])
        if tuple(loaded.shape) != tuple(target.shape):
            raise ValueError(f"layer {layer.prefix}: block scale shape {tuple(loaded.shape)} does not match the "
                             f"expected {tuple(target.shape)} (blocks of {bn} rows over {layer.output_sizes[index]})")
        _check_float(loaded, layer)
        target.copy_(loaded)
    return load


def _check_float(loaded: torch.Tensor, layer: nn.Module) -> None:
    if not loaded.dtype.is_floating_point or loaded.element_size() == 1:
        raise ValueError(f"layer {layer.prefix}: scale dtype {loaded.dtype} is not a 16/32-bit float")


def _check_positive(scale: torch.Tensor, what: str) -> None:
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"{what} holds non-positive or non-finite values")


def _fp8_compute_supported(device: torch.device) -> bool:
    """FP8 tensor cores need compute capability 8.9 (Ada) or newer; the CPU reference emulates them."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)
