"""compressed-tensors checkpoints written by the real library (its presets, compressors and config serialisation)
load into quantkit with weights equal to the library's own dequantize, and run with the scheme's activation
quantization. Also: config parsing, dispatch and the checks that run before any weight is read."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (dev extra)")
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
    fake_quantize,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams

from quantkit import LLM
from quantkit.layers.linear import Linear
from quantkit.quant.compressed_tensors import CompressedTensorsConfig

SHAPES = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
PRESETS = {  # the library's preset scheme (or ours, built from its classes) -> the compression format it is saved in
    "FP8": "float-quantized", "FP8_DYNAMIC": "float-quantized", "W8A8": "int-quantized",
    "FP8_BLOCK": "float-quantized", "INT8_STATIC": "int-quantized", "W4A16": "pack-quantized",
}


def make_scheme(preset: str) -> QuantizationScheme:
    if preset == "INT8_STATIC":  # per-tensor INT8 weights and a static per-tensor input scale (no library preset)
        return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=8, strategy="tensor"),
                                  input_activations=QuantizationArgs(num_bits=8, strategy="tensor", dynamic=False))
    return preset_name_to_scheme(preset, ["Linear"])


def _minmax(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    if args.strategy == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if args.strategy == "group":
        groups = w.unflatten(1, (-1, args.group_size))
        return groups.amin(2), groups.amax(2)
    if args.strategy == "block":
        bn, bk = args.block_structure
        rows, cols = -(-w.shape[0] // bn), -(-w.shape[1] // bk)
        blocks = F.pad(w, (0, cols * bk - w.shape[1], 0, rows * bn - w.shape[0])).reshape(rows, bn, cols, bk)
        return blocks.amin((1, 3)), blocks.amax((1, 3))
    return w.amin().reshape(1), w.amax().reshape(1)


def write_ct_checkpoint(helpers, path, preset: str) -> tuple[dict, torch.nn.Module]:
    """A random Llama saved by transformers, quantized with the library's scheme `preset` and compressed by its
    ModelCompressor; config.json gets the library's own quantization_config. Returns ({module: the library's
    dequantized weight}, a transformers copy of the model carrying those weights)."""
    model = helpers.make_hf_model(path, "llama", seed=3, std=0.08, **SHAPES)
    reference_model = copy.deepcopy(model)
    input_amax = calibrate(model, helpers.random_seqs([9, 17], 256, seed=1))
    qconfig = QuantizationConfig(config_groups={"group_0": make_scheme(preset)},
                                 ignore=["lm_head"])
    apply_quantization_config(model, qconfig, show_progress=False)
    reference = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or not hasattr(module, "weight_scale"):
            continue
        scale, zp = calculate_qparams(*_minmax(module.weight.data, scheme.weights), scheme.weights)
        module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
        if hasattr(module, "input_scale"):  # static activations: amax over the calibration tokens / qmax
            module.input_scale.data.fill_(input_amax[name] / (127 if scheme.weights.type == "int" else 448))
        codes = quantize(module.weight.data, scale, zp, scheme.weights)  # packed formats keep no plain codes
        reference[name] = dequantize(codes, scale, zp, args=scheme.weights, dtype=torch.float32)
    compressor = ModelCompressor.from_pretrained_model(model, PRESETS[preset])
    compressor.compress_model(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name in reference:
        if f"{name}.weight" in state:  # the codes as stored, dequantized by the library
            reference[name] = dequantize(state[f"{name}.weight"], state[f"{name}.weight_scale"],
                                         args=model.get_submodule(name).quantization_scheme.weights,
                                         dtype=torch.float32)
    save_file(state, str(path / "model.safetensors"))
    compressor.update_config(str(path))
    for name, w in reference.items():
        reference_model.get_submodule(name).weight.data.copy_(w)
    return reference, reference_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, helpers):
    """preset -> (checkpoint dir, dequantized weights, transformers reference); each written once per module."""
    cache = {}

    def get(preset: str):
        if preset not in cache:
            path = tmp_path_factory.mktemp(preset.lower())
            cache[preset] = (path, *write_ct_checkpoint(helpers, path, preset))
        return cache[preset]
    return get


@torch.no_grad()
def calibrate(model: torch.nn.Module, seqs: list[torch.Tensor]) -> dict[str, float]:
    """Input amax of every Linear over `seqs` (what a static-activation calibration records)."""
    amax: dict[str, float] = {}
    hooks = [m.register_forward_pre_hook(lambda m, i, n=n: amax.__setitem__(n, max(amax.get(n, 0.0),
                                                                                   i[0].abs().max().item())))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for s in seqs:
        model(input_ids=s[None])
    for h in hooks:
        h.remove()
    return amax


def load(path) -> torch.nn.Module:
    return LLM(str(path), device="cpu", dtype="float32", num_kv_blocks=64, skip_tokenizer_init=True,
               max_model_len=128).llm_engine.model


def our_weight(model, name: str) -> torch.Tensor:
    """Our dequantized kernel-format weight for checkpoint module `name` (the shard of a merged layer)."""
    parts = name.split(".")
    merged, shard = model.packed_modules.get(parts[-1], (parts[-1], 0))
    layer = model.get_submodule(".".join(parts[:-1] + [merged]))
    full = layer.quant_method.dequantized_weight(layer)
    start = sum(layer.output_sizes[:shard])
    return full[start:start + layer.output_sizes[shard]]


def with_act_fake_quant(model: torch.nn.Module, reference: dict, act_args) -> torch.nn.Module:
    """A copy of `model` whose quantized Linears fake-quantize their input per token first (the library's op)."""
    model = copy.deepcopy(model)
    for name in reference:
        model.get_submodule(name).register_forward_pre_hook(_act_fake_quant(act_args))
    return model


def _act_fake_quant(args):
    def hook(module, inputs):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        scale, zp = calculate_qparams(x.amin(1, keepdim=True), x.amax(1, keepdim=True), args)
        return (fake_quantize(x, scale, zp, args).reshape(inputs[0].shape),)
    return hook


@pytest.mark.parametrize("preset", ["FP8", "FP8_DYNAMIC", "W8A8", "FP8_BLOCK", "INT8_STATIC"])
def test_library_checkpoint_dequantizes_exactly(checkpoints, preset):
    path, reference, _ = checkpoints(preset)
    model = load(path)
    assert reference
    for name, w in reference.items():
        ours = our_weight(model, name)
        if preset == "FP8":  # per-tensor scales of q/k/v and gate/up are merged by max + requantize (vLLM)
            assert (ours - w).abs().max() <= w.abs().max() * 2 ** -3, name
        else:
            assert torch.equal(ours, w), name
    assert model.lm_head.quant_method.__class__.__name__ == "UnquantizedMethod"  # ignore: lm_head


@pytest.mark.parametrize("preset, tol", [("FP8_DYNAMIC", 0.15), ("W8A8", 0.05), ("FP8", 0.15),
                                         ("INT8_STATIC", 0.15)])
def test_library_checkpoint_logits(checkpoints, helpers, preset, tol):
    """Against the dequantized weights with unquantized activations: activation quantization (8 bits, per token
    or static) moves these random-model logits by a few percent (FP8's 3 mantissa bits more than INT8)."""
    path, _, reference_model = checkpoints(preset)
    seqs = helpers.random_seqs([9, 17], 256, seed=1)
    err = helpers.max_rel_err(helpers.ours_logits(load(path), seqs), helpers.hf_logits(reference_model, seqs))
    assert 0 < err < tol, err


def test_fp8_dynamic_logits_match_library_fake_quant(checkpoints, helpers):
    """With the library applying the same per-token FP8 activation quantization, logits agree to fp32 rounding."""
    path, reference, reference_model = checkpoints("FP8_DYNAMIC")
    seqs = helpers.random_seqs([9, 17], 256, seed=1)
    act = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).input_activations
    ref = helpers.hf_logits(with_act_fake_quant(reference_model, reference, act), seqs)
    assert helpers.max_rel_err(helpers.ours_logits(load(path), seqs), ref) < 1e-4


def test_fp8_dynamic_layer_equals_library_exactly(checkpoints):
    path, reference, _ = checkpoints("FP8_DYNAMIC")
    model = load(path)
    layer = model.model.layers[0].mlp.down_proj
    act = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).input_activations
    x = torch.randn(7, layer.input_size, generator=torch.Generator().manual_seed(5)) * 3
    expected = F.linear(_act_fake_quant(act)(None, (x,))[0], reference["model.layers.0.mlp.down_proj"])
    assert torch.equal(layer(x), expected)


def _config(groups: dict, **extra) -> dict:
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ["lm_head"], **extra}


def _group(targets, w_type="float", bits=8, strategy="channel", act: dict | None = None, **w_extra) -> dict:
    act = act if act is not None else {"num_bits": 8, "type": w_type, "strategy": "token", "dynamic": True}
    return {"targets": targets, "weights": {"num_bits": bits, "type": w_type, "strategy": strategy,
                                            "symmetric": True, **w_extra}, "input_activations": act}


def test_legacy_compression_config_and_frozen_status(embedded_source):
    from quantkit.config import ModelConfig
    cfg = ModelConfig.from_hf(embedded_source.hf_config)
    legacy = {"compression_config": {**_config({"group_0": _group(["Linear"])}), "format": "naive-quantized",
                                     "quantization_status": "frozen"}}
    config = CompressedTensorsConfig.from_config(legacy, on_the_fly=False)
    config.verify(cfg)
    assert config.groups[0].format == "naive-quantized"


@pytest.mark.parametrize("groups, extra, message", [
    ({"g4": _group(["Linear"], "int", 4, act={})}, {"format": "int-quantized"}, "g4"),
    ({"gasym": _group(["Linear"], "int", symmetric=False)}, {}, "asymmetric 8-bit weights"),
    ({"gblk": _group(["Linear"], "int", strategy="block", block_structure=[128, 128])}, {}, "strategy 'block'"),
    ({"gza": _group(["Linear"], "int", act={"num_bits": 8, "type": "int", "strategy": "tensor",
                                            "symmetric": False, "dynamic": False})}, {}, "input_zero_point"),
    ({"gx": _group(["re:.*nonexistent_proj$"])}, {}, "matches no Linear"),
    ({"a": _group(["Linear"]), "b": _group(["re:.*q_proj$"])}, {}, "several compressed-tensors config groups"),
    ({"g": _group(["Linear"])}, {"kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "attn_head",
                                                     "dynamic": False, "symmetric": True}}, "kv_cache_scheme"),
    ({"g": _group(["Linear"])}, {"quantization_status": "initialized"}, "quantization_status"),
    ({"g": _group(["Linear"])}, {"format": "dense"}, "format 'dense'"),
])
def test_unsupported_schemes_rejected_before_loading(embedded_source, groups, extra, message):
    from quantkit.config import ModelConfig
    cfg = ModelConfig.from_hf(embedded_source.hf_config)
    with pytest.raises(ValueError, match=message):
        CompressedTensorsConfig.from_config(_config(groups, **extra), on_the_fly=False).verify(cfg)


def test_kv_cache_scheme_and_ignore_parsed(embedded_source):
    from quantkit.config import ModelConfig
    cfg = ModelConfig.from_hf(embedded_source.hf_config)
    kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    config = CompressedTensorsConfig.from_config(_config({"g": _group(["Linear"])}, kv_cache_scheme=kv,
                                                         ignore=["lm_head", "re:.*layers\\.0\\.mlp.*"]), False)
    config.verify(cfg)
    assert config.kv_cache_scheme.type == "float"
    gate_up = Linear(576, [1536, 1536], False, torch.float32, config, "model.layers.0.mlp.gate_up_proj",
                     ["gate_proj", "up_proj"])
    qkv = Linear(576, [576, 192, 192], False, torch.float32, config, "model.layers.0.self_attn.qkv_proj",
                 ["q_proj", "k_proj", "v_proj"])
    assert gate_up.weight.dtype == torch.float32 and qkv.weight.dtype == torch.float8_e4m3fn


def test_pack_quantized_dispatches_to_wna16(helpers, tmp_path):
    wna16 = pytest.importorskip("quantkit.quant.wna16", reason="quantkit.quant.wna16 (WNA16) is not written yet")
    config = CompressedTensorsConfig.from_config(_config(
        {"g": _group(["Linear"], "int", 4, strategy="group", group_size=128, act={})}, format="pack-quantized"),
        False)
    layer = Linear(256, [256], False, torch.float32, config, "model.layers.0.mlp.down_proj")
    assert isinstance(layer.quant_method, wna16.PackQuantizedMethod)


def test_library_w4a16_checkpoint_runs_on_wna16(checkpoints, helpers):
    """pack-quantized WNA16 dispatches to quantkit.quant.wna16; weight-only, so logits match the library's
    dequantized weights to fp32 rounding."""
    pytest.importorskip("quantkit.quant.wna16", reason="quantkit.quant.wna16 (WNA16) is not written yet")
    path, _, reference_model = checkpoints("W4A16")
    seqs = helpers.random_seqs([9, 17], 256, seed=1)
    assert helpers.max_rel_err(helpers.ours_logits(load(path), seqs), helpers.hf_logits(reference_model, seqs)) < 1e-4
