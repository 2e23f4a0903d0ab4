"""`quantkit quantize`: the command line over QuantizeConfig (every flag is one of its fields)."""
from __future__ import annotations

import argparse
import json

from quantkit.calibrate.config import (
    KV_CACHE_DTYPES,
    METHODS,
    RTN_FORMATS,
    QuantizeConfig,
)


def add_quantize_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize an FP16 checkpoint into an ecosystem format",
                       description="Quantizes a 16/32-bit Hugging Face checkpoint layer by layer and writes it in "
                                   "the format its method's ecosystem reads (GPTQ, AutoAWQ, compressed-tensors, "
                                   "bitsandbytes).")
    p.add_argument("model_arg", nargs="?", metavar="MODEL", help="alias, Hugging Face directory or .gguf file")
    p.add_argument("--model", help="same as the positional MODEL")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--output", "--out", dest="output", required=True, help="output directory (written atomically)")
    p.add_argument("--bits", type=int, default=None, help="weight bits (default: the method's own, 4 or 8)")
    p.add_argument("--group-size", type=int, default=128, help="inputs per quantization group; -1 = per channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric (gptq/rtn default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="zero-point quantization (awq default)")
    p.add_argument("--desc-act", action="store_true", help="gptq/rtn: act-order (columns by Hessian diagonal)")
    p.add_argument("--static-groups", action="store_true", help="gptq: group qparams fixed before act-order")
    p.add_argument("--damp-percent", type=float, default=0.01, help="gptq: Hessian dampening")
    p.add_argument("--format", default="gptq", choices=RTN_FORMATS, help="rtn: checkpoint format")
    p.add_argument("--activation-scheme", default="dynamic", choices=["dynamic", "static"],
                   help="fp8: per-token dynamic or calibrated per-tensor static activation scales")
    p.add_argument("--alpha", dest="smoothquant_alpha", type=float, default=0.5,
                   help="int8: SmoothQuant migration strength (0 = plain per-channel INT8)")
    p.add_argument("--calib", "--calibration", dest="calibration", default="sharegpt",
                   help="'sharegpt' (the bundled corpus) or a .txt / .jsonl file")
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES,
                   help="also calibrate per-layer FP8 KV-cache scales into the checkpoint")
    p.add_argument("--ignore", nargs="+", default=["lm_head"],
                   help="modules left unquantized (checkpoint names or suffixes, 're:' for a regex)")
    p.add_argument("--device", default="cpu", help="where the layers are computed (cpu, cuda, cuda:1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> None:
    from quantkit.calibrate.pipeline import quantize
    if args.model and args.model_arg and args.model != args.model_arg:
        raise ValueError(f"two models given: {args.model_arg!r} and --model {args.model!r}")
    model = args.model or args.model_arg
    if not model:
        raise ValueError("no model: pass MODEL or --model")
    fields = {k: v for k, v in vars(args).items() if k not in ("model_arg", "model", "func", "command")}
    summary = quantize(QuantizeConfig(model=model, **fields))
    errors = [layer["relative_error"] for layer in summary.layers if layer["relative_error"] is not None]
    print(json.dumps({"output": str(summary.output), "seconds": round(summary.seconds, 1),
                      "mb_before": round(summary.bytes_before / 1e6, 1),
                      "mb_after": round(summary.bytes_after / 1e6, 1),
                      "peak_rss_mb": round(summary.peak_rss_bytes / 1e6),
                      "mean_layer_error": round(sum(errors) / len(errors), 5) if errors else None,
                      "max_layer_error": round(max(errors), 5) if errors else None}, indent=1))
