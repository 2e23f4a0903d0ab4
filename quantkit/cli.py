"""Command line: `quantkit chat | generate`. Engine options map one-to-one onto EngineConfig fields."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, fields

from quantkit.config import EngineConfig
from quantkit.sampling_params import SamplingParams

_ENGINE_FLAGS = ("quantization", "kv_cache_dtype", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                 "kv_cache_memory_gb", "gpu_memory_utilization", "load_format", "device", "seed")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="alias (smollm2-135m), Hugging Face directory, .gguf file, or dummy preset")
    defaults = {f.name: f for f in fields(EngineConfig)}
    for name in _ENGINE_FLAGS:
        default = defaults[name].default
        kind = type(default) if default is not None else (int if "max" in name else str)
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    p.add_argument("--quantization-config", default=None,
                   help='JSON settings for on-the-fly quantization, e.g. \'{"bits": 4, "group_size": 64}\'')


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--sampling-seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the outputs as JSON")


def _llm(args: argparse.Namespace):
    from quantkit.llm import LLM
    overrides = json.loads(args.quantization_config) if args.quantization_config else None
    return LLM(args.model, quantization_config=overrides, **{n: getattr(args, n) for n in _ENGINE_FLAGS})


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sampling_seed)


def _print(outputs: list, as_json: bool) -> None:
    for out in outputs:
        if as_json:
            print(json.dumps({"prompt": out.prompt, "outputs": [asdict(c) for c in out.outputs]}))
        else:
            for c in out.outputs:
                print(c.text)


def cmd_chat(args: argparse.Namespace) -> None:
    llm = _llm(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.message}]
    _print(llm.chat(messages, _sampling(args), use_tqdm=False), args.json)


def cmd_generate(args: argparse.Namespace) -> None:
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    llm = _llm(args)
    _print(llm.generate(prompts, _sampling(args)), args.json)


_QUANTIZE_METHODS = {"rtn": None, "fp8": "fp8", "nf4": "nf4", "fp4": "fp4", "gptq": "gptq"}
_CALIBRATED = ("awq", "int8")


def cmd_quantize(args: argparse.Namespace) -> None:
    from quantkit.checkpoint.resolve import resolve_model
    from quantkit.export import quantize_model_rtn
    if args.method in _CALIBRATED:
        raise ValueError(f"--method {args.method} needs calibration, which quantkit does not ship yet; "
                         "--method rtn writes the uncalibrated baseline in the gptq/awq/pack-quantized formats")
    source = resolve_model(args.model)
    if args.method == "gptq":
        _quantize_gptq(args, source)
        return
    fmt = _QUANTIZE_METHODS[args.method] or args.format
    written = quantize_model_rtn(source.path, args.out, fmt, bits=args.bits, group_size=args.group_size,
                                 sym=not args.asym, overwrite=args.overwrite)
    print(f"wrote {len(written)} quantized Linears ({fmt}) to {args.out}")


def _quantize_gptq(args: argparse.Namespace, source) -> None:
    from transformers import AutoTokenizer

    from quantkit.calibrate.data import CalibrationConfig, calibration_data
    from quantkit.calibrate.gptq import GPTQConfig
    from quantkit.calibrate.sequential import gptq_quantize_model
    config = GPTQConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym, desc_act=args.desc_act)
    calibration = calibration_data(AutoTokenizer.from_pretrained(str(source.path)), CalibrationConfig(
        args.calibration, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed))
    written = gptq_quantize_model(args.model, args.out, calibration, config, args.overwrite)
    print(f"wrote {len(written)} GPTQ-quantized Linears to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantkit", description="Quantization-first LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="answer one chat message through the model's chat template")
    _add_engine_args(chat)
    chat.add_argument("-m", "--message", default="What is the capital of France? Answer in one sentence.")
    chat.add_argument("--system", default=None, help="optional system prompt")
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    gen = sub.add_parser("generate", help="complete raw prompts (from --prompt, or one per line on stdin)")
    _add_engine_args(gen)
    gen.add_argument("-p", "--prompt", action="append", help="a prompt (repeatable)")
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
    quant = sub.add_parser("quantize", help="quantize an FP16 checkpoint into an ecosystem format")
    quant.add_argument("model", help="alias, Hugging Face directory or .gguf file")
    quant.add_argument("--method", required=True, choices=[*_QUANTIZE_METHODS, *_CALIBRATED])
    quant.add_argument("--out", required=True, help="output directory (written atomically)")
    quant.add_argument("--format", default="gptq", choices=["gptq", "awq", "pack-quantized"],
                       help="checkpoint format for --method rtn")
    quant.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    quant.add_argument("--group-size", type=int, default=128)
    quant.add_argument("--asym", action="store_true", help="asymmetric (zero-point) quantization")
    quant.add_argument("--desc-act", action="store_true", help="gptq: act-order (quantize by Hessian diagonal)")
    quant.add_argument("--calibration", default="sharegpt", help="gptq: 'sharegpt' or a .txt/.jsonl file")
    quant.add_argument("--nsamples", type=int, default=128, help="gptq: calibration sequences")
    quant.add_argument("--seqlen", type=int, default=512, help="gptq: tokens per calibration sequence")
    quant.add_argument("--seed", type=int, default=0)
    quant.add_argument("--overwrite", action="store_true")
    quant.set_defaults(func=cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except ValueError as e:
        print(f"quantkit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
