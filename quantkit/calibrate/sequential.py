"""Layer-sequential GPTQ over a whole model: calibration tokens flow through the decoder one layer at a time;
inside a layer the Linears are solved in execution order (qkv, o, gate_up, down), each from inputs that already
see its quantized predecessors (AutoGPTQ's true_sequential), and the next layer receives the quantized layer's
output. Merged qkv / gate_up share one Hessian (same input), and GPTQ treats output rows independently, so
solving the merged weight equals solving each shard."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from quantkit.calibrate.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from quantkit.checkpoint.hf import iterate_tensors
from quantkit.checkpoint.resolve import resolve_model
from quantkit.export.rtn import is_decoder_linear
from quantkit.export.wna16 import IntWeights, gptq_config, gptq_tensors
from quantkit.export.writers import write_checkpoint
from quantkit.layers.attention import AttentionMetadata
from quantkit.layers.linear import Linear
from quantkit.models.loader import build_model

logger = logging.getLogger(__name__)

_ORDER = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def _hessian_of(layer: nn.Module, linear: Linear, run: callable) -> torch.Tensor:
    acc = HessianAccumulator(linear.input_size)
    hook = linear.register_forward_pre_hook(lambda _m, args: acc.add_batch(args[0]))
    try:
        run()
    finally:
        hook.remove()
    return acc.hessian


def _shards(linear: Linear, result, config: GPTQConfig, dtype: torch.dtype) -> dict[str, IntWeights]:
    """Checkpoint module name -> its rows of the solved merged weight, in the writer's layout."""
    out, start = {}, 0
    g_idx = result.g_idx if config.desc_act and not config.static_groups else None
    for name, size in zip(linear.checkpoint_prefixes, linear.output_sizes):
        rows = slice(start, start + size)
        out[name] = IntWeights(result.codes[rows], result.scales[:, rows].t().to(dtype).contiguous(),
                               result.zeros[:, rows].t().contiguous(), config.bits, config.group_size, g_idx)
        start += size
    return out


@torch.inference_mode()
def gptq_quantize_model(model: str, out_dir: Path | str, calibration: torch.Tensor, config: GPTQConfig,
                        overwrite: bool = False) -> dict[str, IntWeights]:
    """calibration: LongTensor [nsamples, seqlen]. Writes a GPTQ checkpoint (v1 for sym; v2 for asym, since v1
    cannot hold a zero point of 0) and returns checkpoint module name -> what was written."""
    source = resolve_model(model)
    net = build_model(source, torch.float32, torch.device("cpu"))
    dtype = next(t.dtype for _, n, t in iterate_tensors(source.path) if is_decoder_linear(n, t))
    n, seqlen = calibration.shape
    ids, positions = calibration.reshape(-1), torch.arange(seqlen).repeat(n)
    meta = AttentionMetadata.for_prefill([seqlen] * n)
    x, residual = net.model.embed_tokens(ids), None
    written: dict[str, IntWeights] = {}
    for layer in tqdm(net.model.layers, desc="GPTQ", unit="layer"):
        run = lambda: layer(positions, x, residual, meta)  # noqa: E731 (re-run as the layer changes)
        for path in _ORDER:
            linear = layer.get_submodule(path)
            result = gptq_quantize(linear.weight.float(), _hessian_of(layer, linear, run), config)
            linear.weight.copy_(result.weight)
            written.update(_shards(linear, result, config, dtype))
        x, residual = run()
    fmt = "gptq" if config.sym else "gptq_v2"
    tensors = {name: t for _, name, t in iterate_tensors(source.path) if not is_decoder_linear(name, t)}
    for module, q in written.items():
        tensors.update({f"{module}.{k}": v for k, v in gptq_tensors(q, fmt).items()})
    quant_config = gptq_config(config.bits, config.group_size, config.sym, config.desc_act, fmt)
    quant_config.update(damp_percent=config.damp_percent, static_groups=config.static_groups,
                        meta={"quantizer": ["quantkit:gptq"]})
    write_checkpoint(source.path, out_dir, tensors, quant_config, {"quantize_config.json": quant_config}, overwrite)
    logger.info("GPTQ: wrote %d Linears (%d-bit, group %d, %s) to %s", len(written), config.bits,
                config.group_size, fmt, out_dir)
    return written
