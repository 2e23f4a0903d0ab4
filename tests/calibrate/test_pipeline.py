"""`quantize()` end to end on small random Llamas: every method writes a checkpoint that loads back and tracks the
float model; AWQ / GPTQ / SmoothQuant beat their baselines where their premise holds; KV scales, --ignore,
layer-by-layer materialization, atomic output and the up-front argument checks."""
from __future__ import annotations

import json

import pytest
import torch

from quantkit import LLM
from quantkit.calibrate import layerwise
from quantkit.calibrate.config import QuantizeConfig
from quantkit.calibrate.pipeline import SUMMARY_FILE, quantize
from quantkit.layers.attention import AttentionMetadata

CALIB = dict(nsamples=8, seqlen=64)


@pytest.fixture(scope="module")
def heldout(model_dir):
    """Windows of held-out text from the calibration text's distribution (what quantization optimizes for)."""
    from transformers import AutoTokenizer

    from quantkit.calibrate.data import CalibrationConfig, calibration_data
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return calibration_data(tokenizer, CalibrationConfig(str(model_dir / "heldout.txt"), nsamples=4, seqlen=48))


def logits(llm: LLM, ids: torch.Tensor) -> torch.Tensor:
    model = llm.llm_engine.model
    n, length = ids.shape
    with torch.no_grad():
        hidden = model(ids.reshape(-1), torch.arange(length).repeat(n), AttentionMetadata.for_prefill([length] * n))
        return model.compute_logits(hidden)


def load(path, **kw) -> LLM:
    return LLM(str(path), device="cpu", skip_tokenizer_init=True, num_kv_blocks=16, **kw)


@pytest.fixture(scope="module")
def reference(model_dir, heldout):
    return logits(load(model_dir), heldout)


def run(model_dir, tmp_path, name, **kw) -> tuple[LLM, float, dict]:
    """Quantizes, loads back, and returns (llm, mean squared logit error vs float on held-out ids, summary)."""
    kw.setdefault("calibration", str(model_dir / "calib.txt"))
    summary = quantize(QuantizeConfig(str(model_dir), output=tmp_path / name, **{**CALIB, **kw}))
    return load(tmp_path / name), summary


def error(llm: LLM, reference: torch.Tensor, heldout: torch.Tensor) -> float:
    return float((logits(llm, heldout) - reference).pow(2).mean())


# Bounds on the relative logit MSE vs the float model on held-out text: ~1.5x what was measured (rtn g32 0.46,
# pack-quantized asym 0.44, gptq act-order 0.10, gptq per-channel asym 0.18, awq 0.16, SmoothQuant int8 0.017,
# fp8 static 0.18, nf4 0.44), so a broken writer or reader (error ~1 or more) fails.
@pytest.mark.parametrize("kw, quant_method, bound", [
    (dict(method="rtn", group_size=32), "gptq", 0.7),
    (dict(method="rtn", group_size=32, format="pack-quantized", sym=False), "compressed-tensors", 0.7),
    (dict(method="gptq", group_size=32, desc_act=True), "gptq", 0.15),
    (dict(method="gptq", group_size=-1, sym=False), "gptq", 0.3),
    (dict(method="awq", group_size=32), "awq", 0.25),
    (dict(method="int8"), "compressed-tensors", 0.03),
    (dict(method="fp8", activation_scheme="static"), "compressed-tensors", 0.3),
    (dict(method="nf4"), "bitsandbytes", 0.7),
])
def test_every_method_loads_back_and_tracks_the_float_model(model_dir, tmp_path, reference, heldout, kw,
                                                             quant_method, bound):
    llm, summary = run(model_dir, tmp_path, "q", **kw)
    config = llm.llm_engine.model_config.quantization_config
    assert config["quant_method"] == quant_method
    err = error(llm, reference, heldout)
    scale = float(reference.pow(2).mean())
    assert 0 < err < bound * scale, (err, scale)
    report = json.loads((tmp_path / "q" / SUMMARY_FILE).read_text())
    assert len(report["layers"]) == 2 and report["bytes_after"] == summary.bytes_after > 0
    assert report["config"]["method"] == kw["method"]


def test_calibrated_methods_beat_their_baselines(model_dir, tmp_path, reference, heldout):
    def err(name, **kw):
        return error(run(model_dir, tmp_path, name, **kw)[0], reference, heldout)
    rtn = err("rtn", method="rtn", group_size=32, sym=False, format="awq")
    awq, gptq = err("awq", method="awq", group_size=32), err("gptq", method="gptq", group_size=32, sym=False)
    plain, smooth = err("int8", method="int8", smoothquant_alpha=0.0), err("sq", method="int8")
    print(f"logit MSE: rtn {rtn:.4g} awq {awq:.4g} gptq {gptq:.4g}; int8 plain {plain:.4g} smoothquant {smooth:.4g}")
    assert awq < rtn and gptq < rtn
    assert smooth < plain


def test_kv_scales_are_calibrated_into_the_checkpoint(model_dir, tmp_path, heldout):
    from safetensors import safe_open
    llm, _ = run(model_dir, tmp_path, "kv", method="fp8", kv_cache_dtype="fp8_e4m3")
    assert llm.llm_engine.model.num_kv_scaled_layers == 2
    config = llm.llm_engine.model_config.quantization_config
    assert config["kv_cache_scheme"]["type"] == "float"
    with safe_open(str(tmp_path / "kv" / "model.safetensors"), "pt") as f:
        scales = {k: f.get_tensor(k) for k in f.keys() if k.endswith(("k_scale", "v_scale"))}
    assert len(scales) == 4 and all(0 < float(s) < 1 for s in scales.values())
    # k_scale of layer 0 = absmax(K after rotary, from the unquantized embedding + layer-0 qkv) / 448
    fp8 = load(tmp_path / "kv", kv_cache_dtype="fp8_e4m3")
    assert fp8.llm_engine.model.model.layers[0].self_attn.attn.k_scale.item() == pytest.approx(
        float(scales["model.layers.0.self_attn.k_scale"]))


def test_ignore_leaves_modules_in_16_bit_and_says_so(model_dir, tmp_path):
    llm, _ = run(model_dir, tmp_path, "ign", method="rtn", group_size=32,
                 ignore=["lm_head", "model.layers.1.mlp.down_proj"])
    down = llm.llm_engine.model.model.layers[1].mlp.down_proj
    assert down.weight.dtype.is_floating_point and not hasattr(down, "qweight")
    assert hasattr(llm.llm_engine.model.model.layers[0].mlp.down_proj, "qweight")
    with pytest.raises(ValueError, match="only some of its merged modules"):
        run(model_dir, tmp_path, "bad", method="rtn", group_size=32, ignore=["k_proj"])
    with pytest.raises(ValueError, match="matches no decoder Linear"):
        run(model_dir, tmp_path, "bad", method="rtn", group_size=32, ignore=["no_such_proj"])


def test_one_layer_is_materialized_at_a_time(model_dir, tmp_path, monkeypatch):
    from quantkit.calibrate.weight_only import WeightOnlyQuantizer
    seen = []
    original = WeightOnlyQuantizer.quantize_layer

    def spy(self, layer, index, batch):
        model_layers = layer_owner["layers"]
        live = [i for i, other in enumerate(model_layers) if not next(other.parameters()).is_meta]
        seen.append((index, live))
        return original(self, layer, index, batch)

    layer_owner = {}
    build = layerwise.build_skeleton

    def remember(*args, **kwargs):
        model = build(*args, **kwargs)
        layer_owner["layers"] = model.model.layers
        return model

    monkeypatch.setattr(layerwise, "build_skeleton", remember)
    monkeypatch.setattr(WeightOnlyQuantizer, "quantize_layer", spy)
    run(model_dir, tmp_path, "mem", method="fp8", activation_scheme="static")
    assert seen == [(0, [0]), (1, [1])]


def test_output_is_complete_or_absent(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        run(model_dir, tmp_path, "out", method="nf4")
    assert (out / "keep.txt").read_text() == "mine"

    from quantkit.calibrate.weight_only import WeightOnlyQuantizer

    def fail(self, layer, index, batch):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(WeightOnlyQuantizer, "quantize_layer", fail)
    with pytest.raises(RuntimeError):
        run(model_dir, tmp_path, "fresh", method="nf4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial output, no staging left behind


@pytest.mark.parametrize("kw, message", [
    (dict(method="gptq", group_size=48), "group_size 48 does not divide .*down_proj"),
    (dict(method="awq", bits=8), "writes \\(4,\\) bits"),
    (dict(method="fp8", activation_scheme="sometimes"), "activation_scheme"),
    (dict(method="nf4", activation_scheme="static"), "fp8 only"),
    (dict(method="hqq"), "method 'hqq'"),
    (dict(method="gptq", calibration="/no/such/file.txt"), "does not exist"),
    (dict(method="int8", smoothquant_alpha=1.5), "smoothquant_alpha"),
])
def test_bad_arguments_fail_before_any_work(model_dir, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        quantize(QuantizeConfig(str(model_dir), output=tmp_path / "x", **kw))
    assert not (tmp_path / "x").exists()


def test_unknown_and_quantized_models_are_refused(model_dir, tmp_path):
    with pytest.raises(ValueError, match="never downloads"):
        quantize(QuantizeConfig("no-such-model", "rtn", tmp_path / "x"))
    run(model_dir, tmp_path, "once", method="nf4")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(QuantizeConfig(str(tmp_path / "once"), "rtn", tmp_path / "twice"))


def test_sharded_output_loads_like_one_file(model_dir, tmp_path, monkeypatch, heldout):
    from quantkit.export import writers
    single, _ = run(model_dir, tmp_path, "single", method="rtn", group_size=32)
    monkeypatch.setattr(writers.CheckpointWriter.__init__, "__defaults__", (False, 64 * 1024))
    sharded, _ = run(model_dir, tmp_path, "sharded", method="rtn", group_size=32)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    assert torch.equal(logits(sharded, heldout), logits(single, heldout))
