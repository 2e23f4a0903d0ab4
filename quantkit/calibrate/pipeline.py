"""`quantkit quantize` end to end: check the request against the model before any work, draw the calibration
set, run the layer-by-layer driver with the method's LayerQuantizer, stream the result into the output
directory (atomically), and write a summary (time, sizes, peak memory, per-layer error table) beside it."""
from __future__ import annotations

import json
import logging
import re
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from quantkit.calibrate.config import QuantizeConfig
from quantkit.calibrate.layerwise import LayerQuantizer, LayerReport, quantize_layerwise
from quantkit.checkpoint.hf import checkpoint_files, iterate_tensors
from quantkit.checkpoint.resolve import ModelSource, resolve_model
from quantkit.config import ModelConfig, resolve_device
from quantkit.export.rtn import Producer, is_decoder_linear, producer
from quantkit.export.writers import CheckpointWriter

logger = logging.getLogger(__name__)

SUMMARY_FILE = "quantkit_quantize.json"
GROUPED = ("awq", "gptq", "rtn")


@dataclass
class QuantizeSummary:
    output: Path
    seconds: float
    bytes_before: int
    bytes_after: int
    peak_rss_bytes: int
    layers: list[dict[str, Any]]


def quantize(config: QuantizeConfig) -> QuantizeSummary:
    """Quantizes config.model into config.output; see QuantizeConfig for the options."""
    start = time.perf_counter()
    source = resolve_model(config.model)
    out = Path(config.output)
    _check(config, source, out)
    device = resolve_device(config.device)
    dtype = _storage_dtype(source)
    skipped = _ignored_modules(config, source)
    quantizer, quant_config, extra_json = _method(config, source, dtype)
    _record_ignored(quant_config, skipped)
    calibration = _calibration(config, source) if config.needs_activations else None
    with CheckpointWriter(source.path, out, config.overwrite) as writer:
        reports = quantize_layerwise(source, quantizer, calibration, writer.add, device,
                                     kv_scales=config.kv_cache_dtype is not None)
        if config.kv_cache_dtype is not None and quant_config.get("quant_method") == "compressed-tensors":
            quant_config["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                               "dynamic": False, "symmetric": True}
        summary = QuantizeSummary(out, time.perf_counter() - start, _bytes(source.path), writer.bytes_written,
                                  _peak_rss(), [asdict(r) for r in reports])
        writer.finish(quant_config, {**extra_json, SUMMARY_FILE: _summary_json(config, summary)})
    logger.info("quantized %s with %s in %.1f s: %.1f MB -> %.1f MB, peak RSS %.0f MB, wrote %s", source.name,
                config.method, summary.seconds, summary.bytes_before / 1e6, summary.bytes_after / 1e6,
                summary.peak_rss_bytes / 1e6, out)
    return summary


def _check(config: QuantizeConfig, source: ModelSource, out: Path) -> None:
    """Everything that can fail before any work does."""
    if source.path is None:
        raise ValueError(f"{config.model!r} is a shape preset without weights; quantize a real checkpoint")
    if source.hf_config.get("quantization_config") or source.hf_config.get("compression_config"):
        raise ValueError(f"{config.model} is already quantized; quantize an unquantized (16/32-bit) checkpoint")
    if out.exists() and not config.overwrite:
        raise ValueError(f"output {out} exists; pass --overwrite to replace it")
    if config.calibration != "sharegpt" and config.needs_activations and not Path(config.calibration).is_file():
        raise ValueError(f"calibration file {str(config.calibration)!r} does not exist")
    if config.method in GROUPED and config.group_size != -1:
        cfg = ModelConfig.from_hf(source.hf_config)
        widths = {"q/k/v_proj, gate/up_proj": cfg.hidden_size, "o_proj": cfg.num_attention_heads * cfg.head_dim,
                  "down_proj": cfg.intermediate_size}
        bad = {names: width for names, width in widths.items() if width % config.group_size}
        if bad:
            listing = ", ".join(f"{names} (in_features {width})" for names, width in bad.items())
            raise ValueError(f"group_size {config.group_size} does not divide the input width of {listing}; "
                             f"the {config.method} kernels and readers (vLLM, AutoAWQ, Marlin) need whole groups: "
                             f"pick a group size that divides them (e.g. 64 or 32) or -1 (per channel)")


def _ignored_modules(config: QuantizeConfig, source: ModelSource) -> list[str]:
    """Checkpoint names of the decoder Linears `ignore` leaves unquantized; an entry that matches nothing (but
    lm_head, which no writer quantizes) or only part of a merged projection is an error, before any work."""
    from quantkit.calibrate.layerwise import build_skeleton
    from quantkit.layers.linear import Linear
    from quantkit.quant.base import layer_skipped, matches_any
    model = build_skeleton(source, torch.device("meta"))
    linears = [m for name, m in model.named_modules() if isinstance(m, Linear) and name.startswith("model.layers.")]
    for entry in config.ignore:
        if entry != "lm_head" and not any(matches_any(p, [entry]) for m in linears for p in m.checkpoint_prefixes):
            raise ValueError(f"--ignore {entry!r} matches no decoder Linear of {config.model} (names look like "
                             f"{linears[0].checkpoint_prefixes[0]!r})")
    return [p for m in linears if layer_skipped(m, config.ignore) for p in m.checkpoint_prefixes]


def _record_ignored(quant_config: dict[str, Any], modules: list[str]) -> None:
    """Writes the unquantized modules where each format's readers look for them."""
    if not modules:
        return
    method = quant_config["quant_method"]
    if method == "gptq":  # GPTQModel's `dynamic`: a '-:' rule skips the modules its regex matches
        quant_config["dynamic"] = {f"-:^({'|'.join(re.escape(m) for m in modules)})$": {}}
    elif method == "awq":
        quant_config["modules_to_not_convert"] = modules
    elif method == "compressed-tensors":
        quant_config["ignore"] = [*quant_config["ignore"], *modules]
    elif method == "bitsandbytes":
        quant_config["llm_int8_skip_modules"] = ["lm_head", *modules]


def _storage_dtype(source: ModelSource) -> torch.dtype:
    """The dtype of the checkpoint's decoder Linear weights: scales are stored in it, as the producers do."""
    for _, name, tensor in iterate_tensors(source.path, lambda n: n.startswith("model.layers.0.")):
        if is_decoder_linear(name, tensor):
            return tensor.dtype
    raise ValueError(f"{source.path}: no decoder Linear weights (model.layers.*.weight) to quantize")


def _calibration(config: QuantizeConfig, source: ModelSource) -> torch.Tensor:
    from transformers import AutoTokenizer

    from quantkit.calibrate.data import CalibrationConfig, calibration_data
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    except (OSError, ValueError) as e:
        raise ValueError(f"calibration tokenizes text with the model's tokenizer, and {source.path} has none that "
                         f"loads ({str(e).splitlines()[0]})") from e
    return calibration_data(tokenizer, CalibrationConfig(config.calibration, config.nsamples, config.seqlen,
                                                         config.seed))


def _method(config: QuantizeConfig, source: ModelSource,
            dtype: torch.dtype) -> tuple[LayerQuantizer, dict[str, Any], dict[str, dict]]:
    """The method's LayerQuantizer, its checkpoint's quantization_config and side-car JSON files."""
    from quantkit.calibrate.weight_only import WeightOnlyQuantizer

    def make(fmt: str, sym: bool | None = None, desc_act: bool = False) -> Producer:
        return producer(fmt, config.bits, config.group_size, config.sym if sym is None else sym, desc_act,
                        config.seed, dtype)

    ignore = tuple(config.ignore)
    if config.method == "gptq":
        return _gptq(config, dtype, ignore)
    if config.method == "awq":
        from quantkit.calibrate.awq import AWQQuantizer
        prod = make("awq")
        return AWQQuantizer(prod, dtype, config.group_size, config.sym, ignore=ignore), prod.config, prod.extra_json
    if config.method == "int8":
        from quantkit.calibrate.smoothquant import SmoothQuantQuantizer
        prod = make("int8")
        return SmoothQuantQuantizer(prod, dtype, config.smoothquant_alpha, ignore), prod.config, prod.extra_json
    fmt = config.format if config.method == "rtn" else config.method
    prod = make(fmt, desc_act=config.desc_act)
    static = config.activation_scheme == "static"
    if static:
        from quantkit.export.w8a8 import W8_TYPES, w8a8_config
        prod.config = w8a8_config(W8_TYPES["fp8"], static_input=True)
    return WeightOnlyQuantizer(prod, dtype, static, ignore), prod.config, prod.extra_json


def _gptq(config: QuantizeConfig, dtype: torch.dtype,
          ignore: tuple[str, ...]) -> tuple[LayerQuantizer, dict[str, Any], dict[str, dict]]:
    from quantkit.calibrate.gptq import GPTQConfig
    from quantkit.calibrate.gptq_layer import GPTQQuantizer
    from quantkit.export.wna16 import gptq_config
    solver = GPTQConfig(bits=config.bits, group_size=config.group_size, sym=config.sym, desc_act=config.desc_act,
                        static_groups=config.static_groups, damp_percent=config.damp_percent)
    fmt = "gptq" if config.sym else "gptq_v2"  # v1 cannot hold a zero point of 0 (FORMATS.md Pitfall 2)
    quant_config = gptq_config(config.bits, config.group_size, config.sym, config.desc_act, fmt)
    quant_config.update(damp_percent=config.damp_percent, static_groups=config.static_groups,
                        meta={"quantizer": ["quantkit:gptq"]})
    return GPTQQuantizer(solver, dtype, fmt, ignore), quant_config, {"quantize_config.json": quant_config}


def _bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint_files(model_dir))


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _summary_json(config: QuantizeConfig, summary: QuantizeSummary) -> dict[str, Any]:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    return {"config": settings, "seconds": round(summary.seconds, 2), "bytes_before": summary.bytes_before,
            "bytes_after": summary.bytes_after, "peak_rss_bytes": summary.peak_rss_bytes,
            "layers": summary.layers}


def load_summary(output: Path | str) -> dict[str, Any]:
    """The summary a finished run left in its output directory."""
    return json.loads((Path(output) / SUMMARY_FILE).read_text())


__all__ = ["QuantizeConfig", "QuantizeSummary", "LayerReport", "load_summary", "quantize"]
