"""Recipes: every shipped recipe validates; each kind of bad input is an error naming the key and its line; unsafe
YAML tags are refused; a tiny recipe runs end to end (eval, bench, report, gates), skips valid steps on a re-run,
and exits non-zero when a gate fails."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantkit.cli import main
from quantkit.harness.recipe import RecipeError, load_recipe

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
GOOD = """\
model: smollm2-135m
engine: {device: cpu}
quantization:
  method: rtn
  bits: 4
eval:
  windows: 2
bench: {num_prompts: 2}
gates: {max_kl_mean: 0.5}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_shipped_recipes_validate():
    assert {p.stem for p in RECIPES} >= {f"smollm2-{m}" for m in
                                         ("fp8", "int8", "awq", "gptq", "nf4", "rtn", "kv-fp8-e4m3", "kv-fp8-e5m2",
                                          "compare")}
    for path in RECIPES:
        recipe = load_recipe(path)
        assert recipe.variants or recipe.bench is not None, path
    compare = load_recipe(RECIPES[[p.stem for p in RECIPES].index("smollm2-compare")])
    assert {v.quantization["method"] for v in compare.variants if v.quantization} == \
        {"fp8", "int8", "awq", "gptq", "nf4", "rtn"}
    assert {v.kv_cache_dtype for v in compare.variants} >= {"fp8_e4m3", "fp8_e5m2"}


def test_good_recipe_parses(tmp_path):
    assert load_recipe(write(tmp_path, GOOD.replace("{device: cpu}", "{device: cpu, async_scheduling: false}"))
                       ).engine == {"device": "cpu", "async_scheduling": False}
    recipe = load_recipe(write(tmp_path, GOOD))
    (variant,) = recipe.variants
    assert variant.name == "r" and variant.quantization["method"] == "rtn" and variant.gates == {"max_kl_mean": 0.5}
    assert recipe.eval.windows == 2 and recipe.bench.num_prompts == 2


@pytest.mark.parametrize("old,new,where", [
    ("engine: {device: cpu}", "engine: {device: cpu, colour: red}", r":2: engine\.colour: unknown key"),
    ("engine: {device: cpu}", "engine: {device: cpu, async_scheduling: sometimes}",
     r":2: engine\.async_scheduling: must be true/false"),
    ("  windows: 2", "  windowz: 2", r":7: eval\.windowz: unknown key"),
    ("gates: {max_kl_mean: 0.5}", "gates: {max_kl: 0.5}", r":9: gates\.max_kl: unknown key"),
    ("  windows: 2", "  windows: two", r":7: eval\.windows: must be an integer, got 'two'"),
    ("  bits: 4", "  bits: [4]", r":5: quantization\.bits: must be an integer"),
    ("bench: {num_prompts: 2}", "bench: 2", r":8: bench: must be a mapping"),
    ("gates: {max_kl_mean: 0.5}", "gates: {max_kl_mean: yes}", r":9: gates\.max_kl_mean: must be a number"),
    ("model: smollm2-135m\n", "", r":1: model: missing \(required\)"),
    ("  method: rtn\n", "", r":4: quantization\.method: missing \(required\)"),
    ("  method: rtn", "  method: magic", r":3: quantization: method 'magic' is not one of"),
    ("  windows: 2", "  windows: 0", r":6: eval: eval windows must be a positive integer"),
])
def test_bad_recipes_name_key_and_line(tmp_path, old, new, where):
    text = GOOD.replace(old, new)
    assert text != GOOD
    with pytest.raises(RecipeError, match=where):
        load_recipe(write(tmp_path, text))


def test_gate_without_its_step_is_an_error(tmp_path):
    text = GOOD.replace("gates: {max_kl_mean: 0.5}", "gates: {min_throughput_ratio: 0.5}").replace(
        "bench: {num_prompts: 2}\n", "")
    with pytest.raises(RecipeError, match=r":8: gates: min_throughput_ratio needs a bench section"):
        load_recipe(write(tmp_path, text))


def test_unsafe_yaml_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    text = GOOD.replace("model: smollm2-135m", f"model: !!python/object/apply:os.system ['touch {marker}']")
    with pytest.raises(RecipeError, match=r":1: model: not a plain YAML value"):
        load_recipe(write(tmp_path, text))
    assert not marker.exists()


def test_tiny_recipe_end_to_end(tmp_path, capsys):
    """Embedded model, CPU, seconds: a KV-only variant and an on-the-fly FP8 variant, eval on a text file,
    a random-token benchmark, report with plots, gates."""
    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(f"Note {i}: quantized models trade memory for accuracy; measure both." for i in
                                range(12)))
    recipe = f"""\
name: tiny
model: smollm2-135m
engine: {{device: cpu, dtype: float32, kv_cache_memory_gb: 0.02}}
variants:
  - {{name: kv8, kv_cache_dtype: fp8_e4m3}}
  - {{name: w8, load_quantization: fp8, gates: {{max_kl_mean: 0.000001}}}}
eval: {{windows: 2, seqlen: 32, chat_prompts: 0, top_k: 16, text_file: {text}}}
bench: {{dataset: random, num_prompts: 2, input_len: 8, output_len: 3, modes: [throughput, latency],
        batch_sizes: [1, 2], latency_input_len: 8, latency_output_len: 3}}
gates: {{max_ppl_increase_pct: 50, min_top1_agreement: 0.5, min_throughput_ratio: 0.01, max_weight_gb: 1}}
output: {tmp_path / "out"}
checkpoints: {tmp_path / "ckpt"}
"""
    path = tmp_path / "tiny.yaml"
    path.write_text(recipe)
    with pytest.raises(SystemExit) as exit_info:  # the w8 gate fails
        main(["run", str(path)])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "eval sizes: text file" in out
    assert "gate kv8" in out and "measured" in out
    assert "gate w8               max_kl_mean" in out and "FAIL" in out  # FP8 weights are not bit-exact
    results = tmp_path / "out"
    gates = json.loads((results / "gates.json").read_text())
    assert not gates["passed"]
    assert all(g["passed"] for g in gates["gates"] if g["variant"] == "kv8")
    kv8 = json.loads((results / "eval" / "kv8.json").read_text())
    assert kv8["kl_mean"] > 0 and kv8["kv_capacity_tokens"] > 0 and kv8["tokens_scored"] == 2 * 31
    for name in ("report.md", "accuracy_vs_memory.png", "throughput.png", "latency.png"):
        assert (results / name).stat().st_size > 0, name
    assert "| kv8 (none, KV fp8_e4m3)" in (results / "report.md").read_text()

    # A re-run skips every step (same fingerprints) and still fails the gate.
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(path)])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 6  # eval x3 (baseline, kv8, w8) + bench x3
