"""Command line: `quantkit chat | generate | quantize | serve | eval | bench | report | run`. Engine options map
one-to-one onto EngineConfig fields; each other command lives beside what it drives."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, fields

from quantkit.calibrate.cli import add_quantize_command
from quantkit.config import EngineConfig
from quantkit.harness.cli import add_harness_commands
from quantkit.sampling_params import SamplingParams
from quantkit.server.cli import add_serve_args
from quantkit.server.cli import serve as serve_command

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
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                   default=defaults["async_scheduling"].default,
                   help="schedule each step while the previous one runs on the device (default: on)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--sampling-seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the outputs as JSON")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    overrides = json.loads(args.quantization_config) if args.quantization_config else None
    return {"quantization_config": overrides, "enforce_eager": args.enforce_eager,
            "async_scheduling": args.async_scheduling, **{n: getattr(args, n) for n in _ENGINE_FLAGS}}


def _llm(args: argparse.Namespace):
    from quantkit.llm import LLM
    return LLM(args.model, **_engine_kwargs(args))


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
    add_quantize_command(sub)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the [serve] extra)")
    _add_engine_args(serve)
    add_serve_args(serve)
    serve.set_defaults(func=lambda args: serve_command(args, _engine_kwargs(args)))
    add_harness_commands(sub, _add_engine_args, _engine_kwargs)
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
