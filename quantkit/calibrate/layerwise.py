"""The layer-by-layer driver behind `quantkit quantize`.

The model is built with every parameter on the meta device; the decoder layers are then materialized one at a
time from the checkpoint (fp32 on the chosen device), quantized by a LayerQuantizer, and released. Calibration
tokens flow through the model alongside: each layer sees the output of the already-quantized layers before it
(what it will see at inference), and the next layer receives this layer's quantized output. Peak memory is one
layer's weights plus the calibration activations (kept in chunks of whole sequences) plus whatever the output
writer buffers before it flushes a shard.

A LayerQuantizer changes the layer in place so that it computes what the checkpoint will (Linear weights become
their dequantized values; AWQ / SmoothQuant fold scales into norms), and returns the checkpoint tensors it
produced for the layer's Linears. The driver writes every other tensor of the layer (norms, biases) from the
layer's current values, copies the tensors outside the layers as they are, and records per layer the time and
the relative output error of the quantized layer against the float layer on the same inputs."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm import tqdm

from quantkit.checkpoint.hf import iterate_tensors
from quantkit.checkpoint.loader import _find_param, _owner, load_weights, map_name
from quantkit.checkpoint.resolve import ModelSource
from quantkit.config import ModelConfig
from quantkit.layers.attention import AttentionMetadata, select_attention_backend
from quantkit.layers.linear import Linear
from quantkit.models.registry import MODEL_CLASSES
from quantkit.quant.base import layer_skipped
from quantkit.quant.kv_cache import FP8_MAX

# Sequences per forward chunk: bounds the transient activations (attention scores, MLP intermediates).
CHUNK_SEQUENCES = 8
KV_SCALE_DTYPE = torch.float8_e4m3fn  # E4M3-ranged KV scales are safe under E5M2 too (its range is wider)


@dataclass
class Chunk:
    """Whole calibration sequences entering a layer: hidden [T, H] and residual [T, H] (None before layer 0)."""
    hidden: torch.Tensor
    residual: torch.Tensor | None
    positions: torch.Tensor
    meta: AttentionMetadata


@dataclass
class LayerBatch:
    chunks: list[Chunk]

    def run(self, layer: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The layer's (hidden, residual) output per chunk."""
        return [layer(c.positions, c.hidden, c.residual, c.meta) for c in self.chunks]

    def capture(self, layer: nn.Module, modules: dict[str, nn.Module]) -> dict[str, list[torch.Tensor]]:
        """Runs the layer and returns, per name, the first positional input each module saw in each chunk."""
        seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0]))
                 for name, m in modules.items()]
        try:
            self.run(layer)
        finally:
            for hook in hooks:
                hook.remove()
        return seen

    def observe(self, layer: nn.Module, modules: dict[str, nn.Module],
                reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Runs the layer and folds each module's input through `reduce` (e.g. per-channel absmax), taking the
        elementwise max over chunks, without keeping the inputs."""
        stats: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def record(_m, args):
                value = reduce(args[0])
                stats[name] = value if name not in stats else torch.maximum(stats[name], value)
            return record

        hooks = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
        try:
            self.run(layer)
        finally:
            for h in hooks:
                h.remove()
        return stats


class LayerQuantizer(Protocol):
    def quantize_layer(self, layer: nn.Module, index: int, batch: LayerBatch | None) -> LayerResult:
        """Quantizes `layer` in place (see the module docstring). batch is None when the run pushes no
        calibration tokens (weight-only methods without KV-scale calibration)."""


@dataclass
class LayerResult:
    """tensors: checkpoint name -> tensor for the layer's quantized Linears (and e.g. their input scales);
    stats: per-layer numbers for the summary table (AWQ's chosen ratios, GPTQ's losses...)."""
    tensors: dict[str, torch.Tensor]
    stats: dict[str, float] = field(default_factory=dict)


def linear_shards(linear: Linear) -> list[tuple[str, slice]]:
    """(checkpoint module name, rows of the merged weight) per shard: qkv_proj -> q_proj, k_proj, v_proj."""
    out, start = [], 0
    for name, size in zip(linear.checkpoint_prefixes, linear.output_sizes):
        out.append((name, slice(start, start + size)))
        start += size
    return out


def decoder_linears(layer: nn.Module, ignore: Sequence[str] = ()) -> dict[str, Linear]:
    """Path inside the layer -> Linear to quantize, in execution order (self_attn.qkv_proj, self_attn.o_proj...);
    `ignore` (checkpoint names, suffixes or 're:' patterns) leaves Linears out."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, Linear) and not layer_skipped(m, ignore)}


# ---- building and materializing -------------------------------------------------------------------------


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside lands on the meta device (attributes kept); buffers stay real."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            meta = nn.Parameter(param.data.to("meta"), requires_grad=False)
            meta.__dict__.update(param.__dict__)
            param = meta
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_skeleton(source: ModelSource, device: torch.device) -> nn.Module:
    """The model with fp32 parameters on meta (no memory) and its buffers (rotary tables, KV scales) real."""
    cfg = ModelConfig.from_hf(source.hf_config)
    with torch.device(device), parameters_on_meta():
        model = MODEL_CLASSES[cfg.architecture](cfg, torch.float32, None, select_attention_backend(device))
    return model.eval()


def materialize(model: nn.Module, prefix: str, source: ModelSource, device: torch.device) -> nn.Module:
    """Allocates the parameters under `prefix` on `device` and loads them from the checkpoint."""
    module = model.get_submodule(prefix)
    _swap_parameters(module, lambda p: torch.empty(p.shape, dtype=p.dtype, device=device))
    load_weights(model, tensors_under(source.path, prefix), str(source.path), prefix=prefix)
    return module


def release(module: nn.Module) -> None:
    _swap_parameters(module, lambda p: torch.empty_like(p, device="meta"))


def _swap_parameters(module: nn.Module, make: Callable[[nn.Parameter], torch.Tensor]) -> None:
    """Replaces every parameter under `module` by a new one holding make(old), attributes (weight loaders,
    shard metadata) kept; a parameter shared inside the module stays shared. (Across meta and a real device
    `param.data = ...` is not allowed, hence new Parameter objects.)"""
    new: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, old in list(sub._parameters.items()):
            if old is None:
                continue
            if id(old) not in new:
                param = nn.Parameter(make(old), requires_grad=False)
                param.__dict__.update(old.__dict__)
                new[id(old)] = param
            sub._parameters[name] = new[id(old)]


def tensors_under(model_dir: Path, prefix: str) -> Iterator[tuple[Path, str, torch.Tensor]]:
    return iterate_tensors(model_dir, lambda name: name.startswith(prefix + "."))


def current_tensor(model: nn.Module, name: str, like: torch.Tensor) -> torch.Tensor:
    """The value checkpoint tensor `name` has in the (possibly rescaled) model now, in `like`'s dtype."""
    mapped = map_name(model, name)
    params = dict(model.named_parameters(remove_duplicate=False))
    param_name = _find_param(params, mapped[0]) if mapped else None
    if param_name is None:
        raise ValueError(f"checkpoint tensor {name!r} has no parameter in the model")
    value = params[param_name].detach()
    owner, _ = _owner(model, param_name)
    if mapped[1] is not None and isinstance(owner, Linear):
        value = value[linear_shards(owner)[mapped[1]][1]]
    return value.to(device="cpu", dtype=like.dtype).clone()


# ---- the driver -------------------------------------------------------------------------------------------


@dataclass
class LayerReport:
    index: int
    seconds: float
    relative_error: float | None  # ||y_q - y|| / ||y|| of the layer output on the same inputs; None without data
    stats: dict[str, float]


def _first_chunks(model: nn.Module, calibration: torch.Tensor, device: torch.device) -> LayerBatch:
    n, seqlen = calibration.shape
    chunks = []
    for start in range(0, n, CHUNK_SEQUENCES):
        ids = calibration[start:start + CHUNK_SEQUENCES].to(device)
        count = ids.shape[0]
        chunks.append(Chunk(model.model.embed_tokens(ids.reshape(-1)), None,
                            torch.arange(seqlen, device=device).repeat(count),
                            AttentionMetadata.for_prefill([seqlen] * count, device)))
    return LayerBatch(chunks)


def _relative_error(new: list[tuple[torch.Tensor, torch.Tensor]], ref: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Error of the residual stream after the layer (hidden + residual is what the next layer adds up)."""
    num = sum(float(((a + b) - (c + d)).float().pow(2).sum()) for (a, b), (c, d) in zip(new, ref))
    den = sum(float((c + d).float().pow(2).sum()) for c, d in ref)
    return (num / den) ** 0.5 if den else 0.0


def _kv_absmax(layer: nn.Module, batch: LayerBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """K (after rotary) and V absmax over the calibration tokens, as they enter the KV cache."""
    attn = next(m for m in layer.modules() if hasattr(m, "k_scale") and hasattr(m, "v_scale"))
    amax = [torch.zeros(()), torch.zeros(())]

    def record(_m, args):
        _, k, v, _ = args
        amax[0] = torch.maximum(amax[0], k.abs().amax().float().cpu())
        amax[1] = torch.maximum(amax[1], v.abs().amax().float().cpu())

    hook = attn.register_forward_pre_hook(record)
    try:
        outputs = batch.run(layer)
    finally:
        hook.remove()
    return amax[0], amax[1], outputs


@torch.inference_mode()
def quantize_layerwise(source: ModelSource, quantizer: LayerQuantizer, calibration: torch.Tensor | None,
                       emit: Callable[[dict[str, torch.Tensor]], None], device: torch.device,
                       kv_scales: bool = False) -> list[LayerReport]:
    """Quantizes every decoder layer of `source` in order and hands each finished tensor group to `emit`
    (full checkpoint names, CPU tensors). calibration: LongTensor [nsamples, seqlen], or None for weight-only
    methods. kv_scales: also emit model.layers.i.self_attn.{k,v}_scale (needs calibration)."""
    if kv_scales and calibration is None:
        raise ValueError("KV-cache scale calibration needs calibration data")
    model = build_skeleton(source, device)
    layer_names = {i: f"model.layers.{i}" for i in range(len(model.model.layers))}
    for _, name, tensor in iterate_tensors(source.path, lambda n: not n.startswith("model.layers.")):
        emit({name: tensor})
    batch = None
    if calibration is not None:
        materialize(model, "model.embed_tokens", source, device)
        batch = _first_chunks(model, calibration, device)
        release(model.model.embed_tokens)
    reports = []
    progress = tqdm(model.model.layers, desc=f"quantize ({type(quantizer).__name__})", unit="layer")
    for i, layer in enumerate(progress):
        start = time.perf_counter()
        materialize(model, layer_names[i], source, device)
        reference = batch.run(layer) if batch is not None else None
        result = quantizer.quantize_layer(layer, i, batch)
        emit(result.tensors)
        emit({name: current_tensor(model, name, t) for _, name, t in tensors_under(source.path, layer_names[i])
              if not _replaced(name, result.tensors)})
        error = None
        if batch is not None:
            if kv_scales:
                k_amax, v_amax, outputs = _kv_absmax(layer, batch)
                emit({f"{layer_names[i]}.self_attn.k_scale": _kv_scale(k_amax),
                      f"{layer_names[i]}.self_attn.v_scale": _kv_scale(v_amax)})
            else:
                outputs = batch.run(layer)
            error = _relative_error(outputs, reference)
            batch = LayerBatch([Chunk(h, r, c.positions, c.meta) for (h, r), c in zip(outputs, batch.chunks)])
        release(layer)
        reports.append(LayerReport(i, time.perf_counter() - start, error, result.stats))
        progress.set_postfix(err=f"{error:.4f}" if error is not None else "-", s=f"{reports[-1].seconds:.1f}")
    return reports


def _kv_scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.clamp(amax / FP8_MAX[KV_SCALE_DTYPE], min=1e-8).reshape(()).float()


def _replaced(name: str, produced: dict[str, torch.Tensor]) -> bool:
    """A source tensor the quantizer superseded: a Linear weight whose module now has quantized tensors."""
    module = name.rsplit(".", 1)[0]
    return name.endswith(".weight") and any(k.startswith(module + ".") for k in produced)
