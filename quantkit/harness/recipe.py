"""YAML recipes: one file describes a quantize -> evaluate -> benchmark -> report -> gate pipeline.

    name: smollm2-fp8                 # optional, default: the file's stem
    model: smollm2-135m               # required: alias, HF directory, .gguf, or dummy preset
    engine: {device: cpu, dtype: float32}           # LLM(...) options shared by every run
    calibration: {source: sharegpt, nsamples: 32, seqlen: 256, seed: 0}
    quantization: {method: fp8}       # QuantizeConfig fields; omit for an unquantized (e.g. KV-only) variant
    kv_cache_dtype: fp8_e4m3          # auto | fp8 | fp8_e4m3 | fp8_e5m2 (scales: checkpoint, else calibrated)
    eval: {windows: 8, seqlen: 256}   # EvalConfig fields; omit to skip evaluation
    bench: {num_prompts: 16}          # BenchConfig fields; omit to skip benchmarking
    gates: {max_ppl_increase_pct: 5, max_kl_mean: 0.05, min_top1_agreement: 0.9}
    output: runs/smollm2-fp8          # results, report and plots (default runs/<name>)
    checkpoints: ~/ckpt               # quantized models (default $QUANTKIT_CACHE/checkpoints/<name>)

`load_quantization: fp8` quantizes on the fly at load instead of writing a checkpoint (dummy weights, quick looks).
Or, instead of those, `variants:` - a list of {name, quantization | load_quantization, kv_cache_dtype, gates};
top-level gates apply to every variant, a variant's own gates override them key by key.

Parsing is `yaml.compose` with the SafeLoader (no arbitrary objects), so every error names the key and its line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from quantkit.harness.bench import BenchConfig
from quantkit.harness.eval import EvalConfig

ENGINE_KEYS = ("device", "dtype", "kv_cache_memory_gb", "num_kv_blocks", "max_model_len", "max_num_seqs",
               "max_num_batched_tokens", "load_format", "gpu_memory_utilization", "seed", "async_scheduling")
CALIBRATION_KEYS = {"source": "calibration", "nsamples": "nsamples", "seqlen": "seqlen", "seed": "seed"}
QUANTIZE_RESERVED = ("model", "output", "overwrite")  # the recipe decides these
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
GATES = {  # gate -> (result key, direction); "max" fails above the limit, "min" below it
    "max_ppl_increase_pct": ("perplexity_increase_pct", "max"),
    "max_kl_mean": ("kl_mean", "max"),
    "min_top1_agreement": ("top1_agreement", "min"),
    "min_greedy_exact_match": ("greedy_exact_match", "min"),
    "min_throughput_ratio": ("throughput_ratio", "min"),
    "max_weight_gb": ("weight_gb", "max"),
}
BENCH_GATES = ("min_throughput_ratio",)


class RecipeError(ValueError):
    """A recipe problem, located: 'file:line: key: what is wrong'."""


# ---- a tiny typed schema over yaml nodes ------------------------------------------------------------------

@dataclass
class Field:
    types: tuple[type, ...]            # accepted Python types of the value (after yaml's safe construction)
    required: bool = False
    item: tuple[type, ...] | None = None   # element types of a list
    schema: dict[str, Field] | None = None   # sub-mapping (or the element mapping of a list)
    nullable: bool = False


_SCALARS = {"int": (int,), "float": (float, int), "bool": (bool,), "str": (str,), "Path": (str,)}


def dataclass_schema(cls: type, exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None
                     ) -> dict[str, Field]:
    """Field types read off a config dataclass's annotations ('int | None', 'list[str]', 'str | Path'), so a
    recipe section accepts exactly what the dataclass does."""
    schema = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude or (only is not None and f.name not in only):
            continue
        parts = [p.strip() for p in str(f.type).split("|")]
        types: tuple[type, ...] = ()
        item = None
        for part in parts:
            if part.startswith("list["):
                types += (list,)
                item = _SCALARS[part[5:-1]]
            elif part != "None":
                types += _SCALARS[part]
        schema[f.name] = Field(tuple(dict.fromkeys(types)), item=item, nullable="None" in parts)
    return schema


def _quantize_schema() -> dict[str, Field]:
    from quantkit.calibrate.config import QuantizeConfig
    schema = dataclass_schema(QuantizeConfig, QUANTIZE_RESERVED)
    schema["method"].required = True
    return schema


def _gates_schema() -> dict[str, Field]:
    return {name: Field((float, int)) for name in GATES}


def _variant_schema() -> dict[str, Field]:
    return {"name": Field((str,), required=True), "quantization": Field((dict,), schema=_quantize_schema(),
                                                                       nullable=True),
            "load_quantization": Field((str,)), "kv_cache_dtype": Field((str,)),
            "gates": Field((dict,), schema=_gates_schema())}


def recipe_schema() -> dict[str, Field]:
    from quantkit.config import EngineConfig
    engine = dataclass_schema(EngineConfig, only=ENGINE_KEYS)
    return {
        "name": Field((str,)), "model": Field((str,), required=True),
        "engine": Field((dict,), schema=engine),
        "calibration": Field((dict,), schema={"source": Field((str,)), "nsamples": Field((int,)),
                                              "seqlen": Field((int,)), "seed": Field((int,))}),
        "quantization": Field((dict,), schema=_quantize_schema(), nullable=True),
        "load_quantization": Field((str,)), "kv_cache_dtype": Field((str,)),
        "variants": Field((list,), schema=_variant_schema()),
        "eval": Field((dict,), schema=dataclass_schema(EvalConfig)),
        "bench": Field((dict,), schema=dataclass_schema(BenchConfig)),
        "gates": Field((dict,), schema=_gates_schema()),
        "output": Field((str,)), "checkpoints": Field((str,)),
    }


def _type_name(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string", list: "a list",
             dict: "a mapping"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


class _Reader:
    def __init__(self, path: str) -> None:
        self.path = path
        self.constructor = yaml.SafeLoader("")

    def error(self, node: yaml.Node, key: str, message: str) -> RecipeError:
        return RecipeError(f"{self.path}:{node.start_mark.line + 1}: {key}: {message}")

    def construct(self, node: yaml.Node, name: str) -> Any:
        """A plain value; tags beyond the safe set (e.g. !!python/object) are refused, never executed."""
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            raise self.error(node, name, f"not a plain YAML value ({getattr(e, 'problem', e)})") from e

    def mapping(self, node: yaml.Node, schema: dict[str, Field], where: str) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, where or "recipe", "must be a mapping of keys to values")
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = self.construct(key_node, where or "recipe")
            name = f"{where}.{key}" if where else str(key)
            if key not in schema:
                raise self.error(key_node, name, f"unknown key; allowed here: {', '.join(schema)}")
            if key in out:
                raise self.error(key_node, name, "given twice")
            out[key] = self.value(value_node, schema[key], name)
        for key, spec in schema.items():
            if spec.required and key not in out:
                raise self.error(node, f"{where}.{key}" if where else key, "missing (required)")
        return out

    def value(self, node: yaml.Node, spec: Field, name: str) -> Any:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            if spec.nullable:
                return None
            raise self.error(node, name, f"must be {_type_name(spec.types)}, got null")
        if spec.schema is not None and dict in spec.types:
            return self.mapping(node, spec.schema, name)
        if spec.schema is not None:  # a list of mappings
            if not isinstance(node, yaml.SequenceNode) or not node.value:
                raise self.error(node, name, "must be a non-empty list of mappings")
            return [self.mapping(item, spec.schema, f"{name}[{i}]") for i, item in enumerate(node.value)]
        value = self.construct(node, name)
        ok = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
        if not ok:
            raise self.error(node, name, f"must be {_type_name(spec.types)}, got {value!r}")
        if isinstance(value, list) and spec.item is not None:
            bad = [v for v in value if not isinstance(v, spec.item) or (isinstance(v, bool) and bool not in spec.item)]
            if bad:
                raise self.error(node, name, f"items must be {_type_name(spec.item)}, got {bad[0]!r}")
        return float(value) if spec.types == (float, int) and not isinstance(value, bool) else value


# ---- the recipe -------------------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    quantization: dict[str, Any] | None   # QuantizeConfig fields (calibration merged in), None = unquantized
    kv_cache_dtype: str = "auto"
    load_quantization: str | None = None  # on-the-fly LLM(quantization=...) instead of a written checkpoint
    gates: dict[str, float] = field(default_factory=dict)

    def fingerprint(self) -> str:
        return _digest({"quantization": self.quantization, "kv": self.kv_cache_dtype,
                        "load_quantization": self.load_quantization})


@dataclass
class Recipe:
    path: Path
    name: str
    model: str
    engine: dict[str, Any]
    variants: list[Variant]
    eval: EvalConfig | None
    bench: BenchConfig | None
    output: Path
    checkpoints: Path


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_recipe(path: str | Path) -> Recipe:
    """Parses and validates everything up front; raises RecipeError naming the file, line and key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from e
    if root is None:
        raise RecipeError(f"{path}: the recipe is empty")
    reader = _Reader(str(path))
    data = reader.mapping(root, recipe_schema(), "")
    nodes = {reader.construct(k, "recipe"): k for k, _ in root.value}  # key nodes: errors point at the key's line
    values = {reader.construct(k, "recipe"): v for k, v in root.value}

    def located(key: str, build: Any) -> Any:
        """Runs a dataclass constructor; its ValueError gets the line of the recipe key it came from."""
        try:
            return build()
        except ValueError as e:
            raise reader.error(nodes[key], key, str(e)) from e

    single = ("quantization", "load_quantization", "kv_cache_dtype")
    if "variants" in data and any(k in data for k in single):
        raise reader.error(nodes["variants"], "variants", f"give either variants or top-level {single}, not both")
    name = data.get("name", path.stem)
    calibration = {CALIBRATION_KEYS[k]: v for k, v in data.get("calibration", {}).items()}
    top_gates = data.get("gates", {})
    # No variant at all: the unquantized baseline alone (e.g. a throughput run beside the peers).
    raw_variants = data.get("variants") or ([{"name": name, **{k: data[k] for k in single if k in data}}]
                                            if any(k in data for k in single) else [])
    variants, seen = [], set()
    for i, raw in enumerate(raw_variants):
        key = f"variants[{i}]" if "variants" in data else "quantization"
        node = values["variants"].value[i] if "variants" in data else nodes.get("quantization", root)
        if raw["name"] in seen or raw["name"] == "baseline":
            raise reader.error(node, key, f"variant name {raw['name']!r} is used twice or reserved")
        seen.add(raw["name"])
        quant = raw.get("quantization")
        if quant is not None:
            quant = {**calibration, **quant}
            _check_quantize(quant, data["model"], lambda e, n=node, k=key: reader.error(n, k, e))
        kv = raw.get("kv_cache_dtype", "auto")
        if kv not in KV_CACHE_DTYPES:
            raise reader.error(node, key, f"kv_cache_dtype {kv!r} is not one of {KV_CACHE_DTYPES}")
        load_quant = raw.get("load_quantization")
        if load_quant is not None:
            from quantkit.quant.registry import get_quant_config
            if quant is not None:
                raise reader.error(node, key, "give quantization (write a checkpoint) or load_quantization "
                                              "(on the fly), not both")
            try:
                get_quant_config(load_quant, None, None,
                                 dummy=data.get("engine", {}).get("load_format") == "dummy")
            except ValueError as e:
                raise reader.error(node, key, f"load_quantization: {e}") from e
        gates = {**top_gates, **raw.get("gates", {})}
        variants.append(Variant(raw["name"], quant, kv, load_quant, gates))
    eval_config = located("eval", lambda: EvalConfig(**data["eval"])) if "eval" in data else None
    bench_config = located("bench", lambda: BenchConfig(**data["bench"])) if "bench" in data else None
    for variant in variants:
        for gate in variant.gates:
            if gate in BENCH_GATES and bench_config is None:
                raise reader.error(nodes.get("gates", root), "gates", f"{gate} needs a bench section")
            if gate not in BENCH_GATES and gate != "max_weight_gb" and eval_config is None:
                raise reader.error(nodes.get("gates", root), "gates", f"{gate} needs an eval section")
    from quantkit.checkpoint.resolve import cache_dir
    checkpoints = data.get("checkpoints", str(cache_dir() / "checkpoints" / name))
    # Relative paths are taken from the current directory, like every other CLI path.
    return Recipe(path, name, data["model"], data.get("engine", {}), variants, eval_config, bench_config,
                  Path(os.path.expanduser(data.get("output", f"runs/{name}"))), Path(os.path.expanduser(checkpoints)))


def _check_quantize(quant: dict[str, Any], model: str, error: Any) -> None:
    """The quantizer's own validation (QuantizeConfig.__post_init__) before anything runs."""
    from quantkit.calibrate.config import QuantizeConfig
    try:
        QuantizeConfig(model=model, output="-", **quant)
    except ValueError as e:
        raise error(str(e)) from e
