"""`quantkit run RECIPE`: quantize (if needed) -> evaluate against the unquantized reference -> benchmark ->
report -> gates. Each step writes JSON carrying a fingerprint of everything its numbers depend on; a step whose
output exists with the same fingerprint is skipped, so re-running a recipe only does what changed.

Layout of `output`: recipe.json, eval/<variant>.json, bench/<variant>.json (the unquantized reference is the
variant 'baseline'), report.md and its PNG plots, gates.json.
"""
from __future__ import annotations

import datetime
import json
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from quantkit.harness.recipe import GATES, Recipe, Variant, _digest, load_recipe

BASELINE = "baseline"


def device_name(device: str = "auto") -> str:
    from quantkit.config import resolve_device
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def provenance(device: str = "auto") -> dict[str, str]:
    return {"device": device_name(device), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["quantkit" if Path(sys.argv[0]).name in ("quantkit", "cli.py") else sys.argv[0],
                                 *sys.argv[1:]])}


def read_valid(path: Path, fingerprint: str) -> dict | None:
    """The step's JSON when it exists, parses and was made from the same inputs; else None (re-run it)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("fingerprint") == fingerprint else None


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


class RecipeRun:
    def __init__(self, recipe: Recipe, force: bool = False) -> None:
        from quantkit.checkpoint.resolve import resolve_model
        from quantkit.harness.eval import model_identity
        self.recipe, self.force = recipe, force
        self.source = resolve_model(recipe.model, recipe.engine.get("load_format", "auto"))
        self.identity = model_identity(recipe.model, **recipe.engine)
        self.models: dict[str, str] = {BASELINE: recipe.model}
        self.fingerprints: dict[str, str] = {BASELINE: _digest([self.identity, recipe.engine])}

    def say(self, text: str) -> None:
        print(f"[{self.recipe.name}] {text}", flush=True)

    def llm_kwargs(self, name: str, variant: Variant | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": self.models[name], **self.recipe.engine}
        if self.source.path is not None:
            kwargs["tokenizer"] = str(self.source.path)  # quantized directories may ship without one
        else:
            kwargs["skip_tokenizer_init"] = True  # dummy shapes have no tokenizer: token-id workloads only
        if variant is not None and variant.load_quantization is not None:
            kwargs["quantization"] = variant.load_quantization
        if variant is not None and variant.kv_cache_dtype != "auto":
            kwargs.update(kv_cache_dtype=variant.kv_cache_dtype, calculate_kv_scales=True)
        return kwargs

    # ---- steps --------------------------------------------------------------------------------------------

    def quantize(self, variant: Variant) -> None:
        fingerprint = _digest([self.fingerprints[BASELINE], variant.fingerprint()])
        self.fingerprints[variant.name] = fingerprint
        self.models[variant.name] = self.recipe.model
        if variant.quantization is None:
            return
        out = self.recipe.checkpoints / variant.name
        self.models[variant.name] = str(out)
        marker = out / "quantkit-recipe.json"
        if not self.force and read_valid(marker, fingerprint) is not None:
            self.say(f"quantize {variant.name}: {out} is up to date, skipped")
            return
        try:
            from quantkit.calibrate.pipeline import quantize
        except ImportError as e:
            raise ValueError("this recipe quantizes, but quantkit.calibrate.pipeline (the quantizer) is not "
                             "installed in this build") from e
        from quantkit.calibrate.config import QuantizeConfig
        self.say(f"quantize {variant.name}: {variant.quantization} -> {out}")
        summary = quantize(QuantizeConfig(model=self.recipe.model, output=out, overwrite=True,
                                          **variant.quantization))
        write_json(marker, {"fingerprint": fingerprint, "quantization": variant.quantization,
                            "seconds": summary.seconds, "bytes_before": summary.bytes_before,
                            "bytes_after": summary.bytes_after, **provenance()})

    def evaluate(self) -> None:
        from transformers import AutoTokenizer

        from quantkit.harness.eval import (
            eval_inputs,
            evaluate,
            load_or_compute_reference,
        )
        from quantkit.llm import LLM
        config = self.recipe.eval
        assert config is not None
        todo = []
        for name in [BASELINE, *(v.name for v in self.recipe.variants)]:
            fingerprint = _digest([self.fingerprints[name], asdict(config), "eval"])
            path = self.recipe.output / "eval" / f"{name}.json"
            if not self.force and read_valid(path, fingerprint) is not None:
                self.say(f"eval {name}: {path} is up to date, skipped")
            else:
                todo.append((name, path, fingerprint))
        if not todo:
            return
        if self.source.path is None:
            raise ValueError(f"eval needs real weights and a tokenizer; {self.recipe.model!r} is a dummy preset")
        inputs = eval_inputs(AutoTokenizer.from_pretrained(str(self.source.path)), config)
        ref_kwargs = self.llm_kwargs(BASELINE, None)
        reference = load_or_compute_reference(ref_kwargs.pop("model"), inputs, config, **ref_kwargs)
        variants = {v.name: v for v in self.recipe.variants}
        for name, path, fingerprint in todo:
            self.say(f"eval {name}")
            if name == BASELINE:
                result = {"perplexity": reference.perplexity, "reference_perplexity": reference.perplexity,
                          "perplexity_increase_pct": 0.0, "kl_mean": 0.0, "kl_p99": 0.0, "top1_agreement": 1.0,
                          "greedy_exact_match": 1.0 if inputs.prompts else None,
                          "weight_bytes": reference.weight_bytes, "tokens_scored": int(reference.top_ids.shape[0]),
                          "eval": asdict(config), "note": "the reference itself (its metrics vs itself by definition)"}
            else:
                result = evaluate(LLM(**self.llm_kwargs(name, variants[name])), inputs, config, reference)
            write_json(path, {"fingerprint": fingerprint, "variant": name, **self._describe(name), **result,
                              **provenance(self.recipe.engine.get("device", "auto"))})

    def bench(self) -> None:
        from quantkit.harness.bench import bench
        config = self.recipe.bench
        assert config is not None
        variants = {v.name: v for v in self.recipe.variants}
        for name in [BASELINE, *variants]:
            # Peers run beside the unquantized baseline only (same precision as theirs).
            run_config = config if name == BASELINE else type(config)(**{**asdict(config), "peers": []})
            fingerprint = _digest([self.fingerprints[name], asdict(run_config), "bench"])
            path = self.recipe.output / "bench" / f"{name}.json"
            if not self.force and read_valid(path, fingerprint) is not None:
                self.say(f"bench {name}: {path} is up to date, skipped")
                continue
            self.say(f"bench {name}")
            result = bench(self.llm_kwargs(name, variants.get(name)), run_config)
            write_json(path, {"fingerprint": fingerprint, "variant": name, **self._describe(name), **result,
                              **provenance(self.recipe.engine.get("device", "auto"))})

    def _describe(self, name: str) -> dict[str, Any]:
        variant = next((v for v in self.recipe.variants if v.name == name), None)
        quant = variant.quantization if variant else None
        method = quant["method"] if quant else (variant.load_quantization if variant else None)
        return {"method": method or "none", "quantization": quant,
                "on_the_fly": bool(variant and variant.load_quantization),
                "kv_cache_dtype": variant.kv_cache_dtype if variant else "auto", "model": self.models[name]}

    def gates(self) -> bool:
        """Prints every gate with its measured value; True when all pass."""
        rows, ok = [], True
        baseline_bench = _load(self.recipe.output / "bench" / f"{BASELINE}.json")
        for variant in self.recipe.variants:
            measured = {**_load(self.recipe.output / "eval" / f"{variant.name}.json")}
            bench_result = _load(self.recipe.output / "bench" / f"{variant.name}.json")
            weight = measured.get("weight_bytes") or bench_result.get("memory", {}).get("weight_bytes")
            if weight is not None:
                measured["weight_gb"] = weight / 1e9
            if bench_result and baseline_bench:
                measured["throughput_ratio"] = (bench_result["throughput"]["quantkit"]["output_tokens_per_s"]
                                                / baseline_bench["throughput"]["quantkit"]["output_tokens_per_s"])
            for gate, limit in variant.gates.items():
                key, direction = GATES[gate]
                value = measured.get(key)
                passed = value is not None and (value <= limit if direction == "max" else value >= limit)
                ok &= passed
                rows.append({"variant": variant.name, "gate": gate, "limit": limit, "measured": value,
                             "passed": passed})
                shown = "missing" if value is None else f"{value:.4g}"
                self.say(f"gate {variant.name:<16} {gate:<24} {'<=' if direction == 'max' else '>='} "
                         f"{limit:<8g} measured {shown:<10} {'PASS' if passed else 'FAIL'}")
        if rows:
            write_json(self.recipe.output / "gates.json", {"passed": ok, "gates": rows})
        return ok


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_recipe(path: str | Path, force: bool = False, output: str | Path | None = None) -> int:
    """The whole pipeline; returns the exit code (1 when a gate fails). `output` overrides the recipe's."""
    from quantkit.harness.report import write_report
    recipe = load_recipe(path)
    if output is not None:
        recipe.output = Path(output)
    run = RecipeRun(recipe, force)
    recipe.output.mkdir(parents=True, exist_ok=True)
    write_json(recipe.output / "recipe.json", {
        "name": recipe.name, "model": recipe.model, "recipe": str(recipe.path),
        "variants": [BASELINE, *(v.name for v in recipe.variants)],
        "eval": recipe.eval.describe() if recipe.eval else None,
        "bench": asdict(recipe.bench) if recipe.bench else None})
    run.say(f"model {recipe.model}; variants: {', '.join(v.name for v in recipe.variants)}")
    if recipe.eval:
        run.say(f"eval sizes: {recipe.eval.describe()}")
    if recipe.bench:
        b = recipe.bench
        run.say(f"bench sizes: {b.num_prompts} {b.dataset} prompts"
                + (f" (outputs capped at {b.max_output_len} tokens)" if b.max_output_len else "")
                + (f"; latency at batch sizes {b.batch_sizes}" if "latency" in b.modes else "")
                + (f"; peers {b.peers}" if b.peers else ""))
    for variant in recipe.variants:
        run.quantize(variant)
    if recipe.eval:
        run.evaluate()
    if recipe.bench:
        run.bench()
    print(write_report(recipe.output))
    return 0 if run.gates() else 1
