"""AWQ (Lin et al.) for one decoder layer, AutoAWQ's search: activation-aware per-input-channel scales s for
each group of Linears that share an input, W -> Q(W * s) and the input divided by s (folded into the preceding
norm or Linear, exact in float), the exponent of s = x_mean^r / w_mean^(1-r) grid-searched to minimize the
output error of the block the input feeds; then a per-group clipping search (weights clamped to a shrunk
range before quantization) minimizing each Linear's output error. Groups (Llama): qkv after the input norm
(block: the attention), o after v where shapes allow (no GQA), gate/up after the post-attention norm (block: the
MLP), down after up. q/k rows are not clipped (attention scores are too sensitive, as AutoAWQ does).
x_mean comes from every calibration token; the grid's loss from the first `search_tokens` of them (the grid
runs the attention or MLP 20 times, and on CPU that is the whole cost), the clipping from `clip_tokens`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.calibrate.layerwise import Chunk, LayerBatch, LayerResult, decoder_linears
from quantkit.calibrate.weight_only import quantize_linear
from quantkit.export.rtn import Producer
from quantkit.export.wna16 import rtn_quantize
from quantkit.layers.linear import Linear

CLIP_ROWS = 1024  # output rows per clipping-search block: [rows, tokens, groups] fp32 stays ~100s of MB

@dataclass
class ScaleGroup:
    """Linear `linear` whose input channels are scaled; `prev` produces those channels (an RMSNorm, or a
    Linear's rows `prev_rows`); `block(x, chunk)` is the computation whose output error the search minimizes."""
    name: str
    prev: nn.Module
    prev_rows: slice | None
    linear: Linear
    block: Callable[[torch.Tensor, Chunk], torch.Tensor]


def scale_groups(layer: nn.Module) -> list[ScaleGroup]:
    attn, mlp = layer.self_attn, layer.mlp
    v = attn.qkv_proj.output_sizes[2]
    inter = mlp.gate_up_proj.output_sizes[0]
    groups = [ScaleGroup("qkv", layer.input_layernorm, None, attn.qkv_proj,
                         lambda x, c: attn(c.positions, x, c.meta))]
    if v == attn.o_proj.input_size:
        groups.append(ScaleGroup("o", attn.qkv_proj, slice(attn.qkv_proj.output_size - v, None), attn.o_proj,
                                 lambda x, c: attn.o_proj(x)))
    groups.append(ScaleGroup("gate_up", layer.post_attention_layernorm, None, mlp.gate_up_proj,
                             lambda x, c: mlp(x)))
    groups.append(ScaleGroup("down", mlp.gate_up_proj, slice(inter, None), mlp.down_proj,
                             lambda x, c: mlp.down_proj(x)))
    return groups


@dataclass
class AWQQuantizer:
    producer: Producer
    dtype: torch.dtype
    group_size: int
    sym: bool = False
    bits: int = 4
    n_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    search_tokens: int = 4096
    ignore: tuple[str, ...] = ()

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """The asymmetric group quantizer the checkpoint uses, in fp32."""
        return rtn_quantize(w, self.bits, self.group_size, self.sym).dequantize().to(w)

    def quantize_layer(self, layer: nn.Module, index: int, batch: LayerBatch | None) -> LayerResult:
        if batch is None:
            raise ValueError("AWQ needs calibration data")
        linears = decoder_linears(layer, self.ignore)
        groups = [g for g in scale_groups(layer) if g.linear in linears.values()]
        inputs = batch.capture(layer, {g.name: g.linear for g in groups})
        stats = {}
        n = _chunks_for(batch.chunks, self.search_tokens)
        for group in groups:
            ratio, scales = self._search_scales(group, inputs[group.name], batch.chunks[:n])
            _apply_scales(group, scales)
            stats[f"{group.name}.ratio"] = ratio
        inputs = batch.capture(layer, linears)  # after scaling: what the quantized Linears will see
        tensors = {}
        for path, linear in linears.items():
            rows = _clippable_rows(linear)
            if rows is not None:
                x = torch.cat([c.reshape(-1, c.shape[-1]) for c in inputs[path]])
                w = linear.weight[rows]
                linear.weight[rows] = w.clamp(-(limit := self._search_clip(w, x)), limit)
            tensors.update(quantize_linear(linear, self.producer, self.dtype))
        return LayerResult(tensors, stats)

    def _search_scales(self, group: ScaleGroup, inputs: list[torch.Tensor],
                       chunks: list[Chunk]) -> tuple[float, torch.Tensor]:
        """(best exponent r, scales [K]) minimizing the block's output MSE with the group's weights quantized."""
        x_mean = sum(x.abs().float().sum(0) for x in inputs) / sum(x.shape[0] for x in inputs)
        inputs = inputs[:len(chunks)]  # the loss is measured on the first chunks only (search_tokens)
        w = group.linear.weight
        grouped = w.abs().unflatten(1, (-1, self._group(w)))
        w_mean = (grouped / (grouped.amax(-1, keepdim=True) + 1e-6)).flatten(1).mean(0)
        reference = [group.block(x, c) for x, c in zip(inputs, chunks)]
        original = w.clone()
        best = (float("inf"), 0.0, torch.ones_like(x_mean))
        try:
            for step in range(self.n_grid):
                ratio = step / self.n_grid
                scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
                scales = scales / (scales.max() * scales.min()).sqrt()
                w.copy_(self.fake_quantize(original * scales) / scales)
                loss = sum(float((group.block(x, c) - ref).float().pow(2).sum())
                           for x, c, ref in zip(inputs, chunks, reference))
                if loss < best[0]:
                    best = (loss, ratio, scales)
        finally:
            w.copy_(original)
        return best[1], best[2]

    def _search_clip(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per (output row, group) clipping limit [N, K] (broadcast over the group) minimizing the MSE of that
        group's partial dot products over a token subsample; rows in blocks to bound memory."""
        x = x[::max(1, x.shape[0] // self.clip_tokens)].float()
        return torch.cat([self._clip_rows(w[r:r + CLIP_ROWS], x) for r in range(0, w.shape[0], CLIP_ROWS)])

    def _clip_rows(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        g = self._group(w)
        xg = x.unflatten(1, (-1, g))                                   # [T, NG, g]
        wg = w.unflatten(1, (-1, g))                                   # [N, NG, g]
        full = torch.einsum("tkg,nkg->ntk", xg, wg)                    # [N, T, NG]
        org_max = wg.abs().amax(-1)                                    # [N, NG]
        best_err = torch.full_like(org_max, float("inf"))
        best_max = org_max.clone()
        for step in range(int(self.max_shrink * self.n_grid)):
            limit = org_max * (1 - step / self.n_grid)
            clipped = wg.clamp(-limit[..., None], limit[..., None]).flatten(1)
            q = self.fake_quantize(clipped).unflatten(1, (-1, g))
            err = (torch.einsum("tkg,nkg->ntk", xg, q) - full).pow(2).mean(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, limit, best_max)
        return best_max.repeat_interleave(g, dim=1)

    def _group(self, w: torch.Tensor) -> int:
        return w.shape[1] if self.group_size == -1 else self.group_size


def _chunks_for(chunks: list[Chunk], tokens: int) -> int:
    """How many leading chunks hold at least `tokens` tokens (all if they hold fewer; at least one)."""
    total = 0
    for i, chunk in enumerate(chunks, 1):
        total += chunk.hidden.shape[0]
        if total >= tokens:
            return i
    return len(chunks)


def _apply_scales(group: ScaleGroup, scales: torch.Tensor) -> None:
    """Input channels of `linear` times s, the channels' producer divided by s: the float function is unchanged."""
    group.linear.weight.mul_(scales)
    if isinstance(group.prev, Linear):
        group.prev.weight[group.prev_rows] /= scales[:, None]
        if group.prev.bias is not None:
            group.prev.bias[group.prev_rows] /= scales
    else:
        group.prev.weight.div_(scales)


def _clippable_rows(linear: Linear) -> slice | None:
    """All rows, except q/k of a merged qkv projection (only its v rows are clipped)."""
    names = [n.rsplit(".", 1)[-1] for n in linear.checkpoint_prefixes]
    if "q_proj" in names:
        return slice(linear.output_size - linear.output_sizes[names.index("v_proj")], None) \
            if "v_proj" in names else None
    return slice(None)
