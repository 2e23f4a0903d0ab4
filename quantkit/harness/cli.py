"""The harness subcommands: `quantkit eval | bench | report | run`. quantkit/cli.py registers them with its own
engine-flag helpers so every command spells the engine options the same way."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantkit.harness.bench import BenchConfig
from quantkit.harness.eval import EvalConfig

# Engine options a reference shares with the evaluated model (never its quantization or KV dtype).
_REFERENCE_KEYS = ("dtype", "device", "load_format", "max_model_len", "kv_cache_memory_gb", "seed")


def _add_dataclass_args(p: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per config field (--field-name), typed from the field's default."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(default, list):
            kind = int if default and isinstance(default[0], int) else str
            p.add_argument(flag, type=kind, nargs="+", default=default)
        else:
            kind = type(default) if default is not None else (int if "len" in f.name else str)
            p.add_argument(flag, type=kind, default=default)


def _config(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def _emit(result: dict, out: str | None, device: str) -> None:
    from quantkit.harness.runner import provenance, write_json
    result = {**result, **provenance(device)}
    if out:
        write_json(Path(out), result)
        print(f"wrote {out}")
    print(json.dumps(result, indent=2))


def cmd_eval(args: argparse.Namespace, engine_kwargs: dict) -> None:
    from quantkit.checkpoint.resolve import resolve_model
    from quantkit.harness.eval import eval_inputs, evaluate, load_or_compute_reference
    from quantkit.llm import LLM
    config = _config(EvalConfig, args)
    source = resolve_model(args.model, engine_kwargs.get("load_format", "auto"))
    if args.reference is None and source.hf_config.get("quantization_config") and not args.no_reference:
        raise ValueError(f"{args.model} is a quantized checkpoint: pass --reference BASE_MODEL (its unquantized "
                         "source) for KL/agreement, or --no-reference for perplexity only")
    llm = LLM(args.model, **engine_kwargs)
    print(f"eval: {config.describe()}", flush=True)
    inputs = eval_inputs(llm.get_tokenizer(), config)
    reference = None
    if not args.no_reference:
        ref_kwargs = {k: v for k, v in engine_kwargs.items() if k in _REFERENCE_KEYS}
        reference = load_or_compute_reference(args.reference or args.model, inputs, config, **ref_kwargs)
    result = evaluate(llm, inputs, config, reference)
    _emit({"model": args.model, "reference": None if args.no_reference else (args.reference or args.model),
           "quantization": engine_kwargs.get("quantization"), "kv_cache_dtype": engine_kwargs.get("kv_cache_dtype"),
           **result}, args.out, args.device)


def cmd_bench(args: argparse.Namespace, engine_kwargs: dict) -> None:
    from quantkit.harness.bench import bench
    config = _config(BenchConfig, args)
    _emit({"model": args.model, "quantization": engine_kwargs.get("quantization"),
           **bench({"model": args.model, **engine_kwargs}, config)}, args.out, args.device)


def cmd_report(args: argparse.Namespace) -> None:
    from quantkit.harness.report import write_report
    print(write_report(args.dir))
    print(f"wrote {Path(args.dir) / 'report.md'} and its plots")


def cmd_run(args: argparse.Namespace) -> None:
    from quantkit.harness.runner import run_recipe
    code = run_recipe(args.recipe, force=args.force, output=args.output)
    if code:
        print("quantkit run: a gate failed", file=sys.stderr)
        sys.exit(code)


def add_harness_commands(sub: Any, add_engine_args: Callable[[argparse.ArgumentParser], None],
                         engine_kwargs: Callable[[argparse.Namespace], dict]) -> None:
    ev = sub.add_parser("eval", help="perplexity, KL vs the unquantized reference, top-1 agreement, greedy match")
    add_engine_args(ev)
    _add_dataclass_args(ev, EvalConfig, skip=("seed",))  # --seed is the engine's, shared
    ev.add_argument("--reference", default=None, help="unquantized reference (default: MODEL without quantization)")
    ev.add_argument("--no-reference", action="store_true", help="perplexity only")
    ev.add_argument("--out", default=None, help="write the JSON result here")
    ev.add_argument("--calculate-kv-scales", action="store_true", help="FP8 KV: calibrate k/v scales")
    ev.set_defaults(func=lambda a: cmd_eval(a, {**engine_kwargs(a), "calculate_kv_scales": a.calculate_kv_scales}))

    be = sub.add_parser("bench", help="offline throughput, latency per batch size, memory; peers side by side")
    add_engine_args(be)
    _add_dataclass_args(be, BenchConfig, skip=("seed",))
    be.add_argument("--out", default=None, help="write the JSON result here")
    be.add_argument("--calculate-kv-scales", action="store_true", help="FP8 KV: calibrate k/v scales")
    be.set_defaults(func=lambda a: cmd_bench(a, {**engine_kwargs(a), "calculate_kv_scales": a.calculate_kv_scales}))

    rep = sub.add_parser("report", help="markdown table + PNG plots from a recipe's output directory")
    rep.add_argument("dir", help="a recipe's output directory (holding eval/ and bench/)")
    rep.set_defaults(func=cmd_report)

    run = sub.add_parser("run", help="run a YAML recipe: quantize, evaluate, benchmark, report, gates")
    run.add_argument("recipe", help="recipes/NAME.yaml")
    run.add_argument("--force", action="store_true", help="re-run every step even when its output is valid")
    run.add_argument("--output", default=None, help="results directory (overrides the recipe's output)")
    run.set_defaults(func=cmd_run)
