"""W8A8 (FP8 E4M3 and INT8) linear method: activation/weight quantizers, the reference matmul against
independent references, HF `fp8` checkpoints (per-tensor with the max/requantize rule, block with shards whose N is
not a multiple of 128), on-the-fly quantization end to end, resident memory, and the loading error paths."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from quantkit.checkpoint.hf import CheckpointError
from quantkit.checkpoint.resolve import resolve_model
from quantkit.layers.linear import Linear
from quantkit.models.loader import build_model
from quantkit.quant.fp8 import Fp8Config
from quantkit.quant.int8 import Int8Config
from quantkit.quant.registry import get_quant_config
from quantkit.quant.w8a8 import FP8, INT8, quantize_dynamic

CPU = torch.device("cpu")
SMOL = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}  # SmolLM2
SHAPES = [(576, 192), (576, 1536), (1536, 576), (192, 576)]  # (K, N)


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("qtype", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("k", [576, 1536, 192])
@pytest.mark.parametrize("magnitude", [1.0, 1e4])
def test_dynamic_quantization_per_token(qtype, k, magnitude):
    x = randn(13, k, seed=k, scale=magnitude)
    x[3] = 0.0  # an all-zero row must quantize to zeros, not NaN
    q, scale = quantize_dynamic(x, qtype)
    assert q.dtype == qtype.dtype and scale.shape == (13, 1)
    deq = q.float() * scale
    assert torch.isfinite(deq).all() and torch.equal(deq[3], torch.zeros(k))
    assert torch.equal(q.float().abs().amax(1)[[0, 1, 2, 4]], torch.full((4,), qtype.qmax))  # amax maps to qmax
    rel = (deq - x).norm() / x.norm()
    assert rel < (0.04 if qtype is FP8 else 0.01), rel


@pytest.mark.parametrize("k", [576, 192])
def test_group_quantization_partial_last_group(k):
    x = randn(5, k, seed=1)
    _, scale = quantize_dynamic(x, FP8, group=128)
    assert scale.shape == (5, -(-k // 128))
    last = x[:, (scale.shape[1] - 1) * 128:]
    assert torch.allclose(scale[:, -1], last.abs().amax(1) / 448)


def _on_the_fly_linear(config, k: int, output_sizes: list[int], seed: int) -> tuple[Linear, torch.Tensor]:
    layer = Linear(k, output_sizes, True, torch.float32, config, "model.layers.0.mlp.gate_up_proj")
    w = randn(sum(output_sizes), k, seed=seed, scale=0.05)
    layer.weight.data.copy_(w)
    layer.bias.data.copy_(randn(sum(output_sizes), seed=seed + 1))
    layer.quant_method.process_weights_after_loading(layer)
    return layer, w


@pytest.mark.parametrize("k, n", SHAPES)
def test_int8_matmul_is_exact_integer_arithmetic(k, n):
    layer, w = _on_the_fly_linear(Int8Config(), k, [n], seed=k + n)
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.shape == (n, 1)
    assert torch.equal(layer.weight_scale, (w.abs().amax(1, keepdim=True) / 127))
    x = randn(9, k, seed=n, scale=3.0)
    x_scale = x.abs().amax(1, keepdim=True) / 127
    x_q = (x / x_scale).round().to(torch.int64)
    acc = x_q @ layer.weight.to(torch.int64).T  # exact int64 reference
    expected = acc.double() * x_scale.double() * layer.weight_scale.double().T
    assert torch.equal(layer(x), (expected.float() + layer.bias))


@pytest.mark.parametrize("k, n", SHAPES)
def test_fp8_matmul_matches_dequantized_reference(k, n):
    layer, w = _on_the_fly_linear(Fp8Config(on_the_fly=True), k, [n], seed=k + n)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (n, 1)
    x = randn(9, k, seed=n, scale=3.0)
    x_scale = x.abs().amax(1, keepdim=True) / 448
    x_deq = (x / x_scale).to(torch.float8_e4m3fn).float() * x_scale
    w_scale = w.abs().amax(1, keepdim=True) / 448
    w_deq = (w / w_scale).to(torch.float8_e4m3fn).float() * w_scale
    assert torch.equal(layer(x), F.linear(x_deq, w_deq, layer.bias))
    assert (layer(x) - F.linear(x, w, layer.bias)).norm() / F.linear(x, w).norm() < 0.06


@pytest.mark.parametrize("config", [Fp8Config(on_the_fly=True), Int8Config()], ids=["fp8", "int8"])
def test_large_activations_stay_finite(config):
    layer, _ = _on_the_fly_linear(config, 576, [576, 192, 192], seed=2)
    x = randn(4, 576, seed=3, scale=1e4)
    x[0, 7] = 6e4  # one huge outlier in a row
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


# ---- HF `fp8` checkpoints ----------------------------------------------------------------------------------------

def _write_fp8_checkpoint(helpers, path, quant: dict, quantize_fn) -> torch.nn.Module:
    """A random SmolLM2-shaped 2-layer Llama whose decoder Linears are replaced by `quantize_fn(name, w)` ->
    {tensor suffix: tensor}. Returns the transformers model (unquantized weights)."""
    model = helpers.make_hf_model(path, "llama", seed=4, std=0.05, num_hidden_layers=2, **SMOL)
    state = load_file(str(path / "model.safetensors"))
    for name in [n for n in state if n.endswith("proj.weight")]:
        prefix = name[: -len("weight")]
        del state[name]
        state.update({prefix + suffix: t for suffix, t in quantize_fn(name, state.get(name, model.state_dict()[name]))
                      .items()})
    save_file(state, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quant
    (path / "config.json").write_text(json.dumps(config))
    return model


SHARD_FACTOR = {"q_proj": 1.0, "k_proj": 2.5, "v_proj": 1.7, "gate_proj": 1.0, "up_proj": 3.0}


def _per_tensor(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """AutoFP8 style, with deliberately different scales per shard of q/k/v and gate/up."""
    scale = w.abs().amax() / 448 * SHARD_FACTOR.get(name.split(".")[-2], 1.0)
    return {"weight": (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn), "weight_scale": scale.reshape(()),
            "input_scale": torch.tensor([0.01 * SHARD_FACTOR.get(name.split(".")[-2], 1.0)])}


def test_per_tensor_fp8_max_requantize(helpers, tmp_path):
    _write_fp8_checkpoint(helpers, tmp_path, {"quant_method": "fp8", "activation_scheme": "static"}, _per_tensor)
    source = resolve_model(str(tmp_path))
    model = build_model(source, torch.float32, CPU, quant_config=get_quant_config(None, source.hf_config
                                                                                  ["quantization_config"]))
    state = load_file(str(tmp_path / "model.safetensors"))
    qkv = model.model.layers[1].self_attn.qkv_proj
    p = "model.layers.1.self_attn."
    scales = [state[f"{p}{s}.weight_scale"] for s in ("q_proj", "k_proj", "v_proj")]
    top = torch.stack(scales).max()
    assert torch.equal(qkv.weight_scale, top.expand(960, 1))  # one scale: the max over shards, per channel
    assert torch.equal(qkv.input_scale, torch.tensor(0.025))   # input scales: max over shards too
    for shard, (name, scale) in enumerate(zip(("q_proj", "k_proj", "v_proj"), scales)):
        rows = slice(sum(qkv.output_sizes[:shard]), sum(qkv.output_sizes[:shard + 1]))
        expected = (state[f"{p}{name}.weight"].float() * scale / top).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(qkv.weight[rows].view(torch.uint8), expected.view(torch.uint8)), name
    assert torch.equal(qkv.weight[576:768].view(torch.uint8), state[f"{p}k_proj.weight"].view(torch.uint8))
    x = randn(6, 576, seed=9)
    x_deq = (x / 0.025).clamp(-448, 448).to(torch.float8_e4m3fn).float() * 0.025
    assert torch.equal(qkv(x), F.linear(x_deq, qkv.weight.float() * top))


def _block(name: str, w: torch.Tensor, bn: int = 128, bk: int = 128) -> dict[str, torch.Tensor]:
    """transformers FineGrainedFP8 style: weight_scale_inv [ceil(N/bn), ceil(K/bk)] multiplier per block."""
    n, k = w.shape
    rows, cols = -(-n // bn), -(-k // bk)
    blocks = F.pad(w, (0, cols * bk - k, 0, rows * bn - n)).reshape(rows, bn, cols, bk)
    scale = blocks.abs().amax((1, 3)) / 448
    full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return {"weight": (w / full).to(torch.float8_e4m3fn), "weight_scale_inv": scale}


def test_block_fp8_with_unaligned_shards(helpers, tmp_path):
    """SmolLM2's k/v shards have N=192 and K=576 is not a multiple of 128 either: each shard keeps its own block
    grid and the dequantized weights equal a per-tensor block dequantization exactly."""
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    hf = _write_fp8_checkpoint(helpers, tmp_path, quant, _block)
    source = resolve_model(str(tmp_path))
    model = build_model(source, torch.float32, CPU, quant_config=get_quant_config(None, quant))
    state = load_file(str(tmp_path / "model.safetensors"))
    qkv = model.model.layers[0].self_attn.qkv_proj
    deq = qkv.quant_method.dequantized_weight(qkv)
    for shard, name in enumerate(("q_proj", "k_proj", "v_proj")):
        p = f"model.layers.0.self_attn.{name}."
        w, s = state[p + "weight"], state[p + "weight_scale_inv"]
        expected = w.float() * s.repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :576]
        rows = slice(sum(qkv.output_sizes[:shard]), sum(qkv.output_sizes[:shard + 1]))
        assert torch.equal(deq[rows], expected), name
    seqs = helpers.random_seqs([11, 6], 256, seed=2)
    ours = helpers.ours_logits(model, seqs)
    err = helpers.max_rel_err(ours, helpers.hf_logits(hf, seqs))
    assert 0 < err < 0.2, err  # weights and activations both FP8 vs the unquantized random model
    for name, module in hf.named_modules():  # the same arithmetic, written independently on transformers
        if name + ".weight_scale_inv" in state:
            w, s = state[name + ".weight"], state[name + ".weight_scale_inv"]
            module.weight.data = w.float() * s.repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[
                :, :w.shape[1]]
            module.register_forward_pre_hook(_fake_quant_groups_of_128)
    assert helpers.max_rel_err(ours, helpers.hf_logits(hf, seqs)) < 1e-4


def _fake_quant_groups_of_128(module, inputs):
    x = inputs[0]
    groups = F.pad(x, (0, -x.shape[-1] % 128)).unflatten(-1, (-1, 128))
    scale = groups.abs().amax(-1, keepdim=True) / 448
    return ((groups / scale).to(torch.float8_e4m3fn).float() * scale).flatten(-2)[..., :x.shape[-1]],


# ---- error paths -------------------------------------------------------------------------------------------------

def _load(tmp_path, quant):
    source = resolve_model(str(tmp_path))
    return build_model(source, torch.float32, CPU, quant_config=get_quant_config(None, quant))


def test_wrong_weight_dtype_names_tensor(helpers, tmp_path):
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic"}

    def as_int8(name, w):
        out = _per_tensor(name, w)
        del out["input_scale"]
        if name == "model.layers.1.mlp.down_proj.weight":
            out["weight"] = out["weight"].view(torch.int8)
        return out
    _write_fp8_checkpoint(helpers, tmp_path, quant, as_int8)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*int8.*float8_e4m3fn"):
        _load(tmp_path, quant)


def test_missing_weight_scale_names_tensor(helpers, tmp_path):
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic"}

    def drop_scale(name, w):
        out = _per_tensor(name, w)
        del out["input_scale"]
        if name == "model.layers.0.self_attn.v_proj.weight":
            del out["weight_scale"]
        return out
    _write_fp8_checkpoint(helpers, tmp_path, quant, drop_scale)
    with pytest.raises(CheckpointError, match=r"missing tensors.*model\.layers\.0\.self_attn\.v_proj\.weight_scale"):
        _load(tmp_path, quant)


@pytest.mark.parametrize("bad, message", [
    ("per_channel_scale", r"down_proj\.weight_scale.*expected a per-tensor scale"),
    ("block_shape", r"k_proj\.weight_scale_inv.*block scale shape \(1, 5\) does not match the expected \(2, 5\)"),
    ("negative", r"layer model\.layers\.0\.mlp\.gate_up_proj: weight_scale holds non-positive"),
])
def test_bad_scales_name_layer_and_tensor(helpers, tmp_path, bad, message):
    block = bad == "block_shape"
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic", **({"weight_block_size": [128, 128]}
                                                                        if block else {})}

    def corrupt(name, w):
        out = _block(name, w) if block else _per_tensor(name, w)
        out.pop("input_scale", None)
        if bad == "per_channel_scale" and "down_proj" in name:
            out["weight_scale"] = out["weight_scale"].expand(w.shape[0], 1).clone()
        elif block and "k_proj" in name:
            out["weight_scale_inv"] = out["weight_scale_inv"][:1]
        elif bad == "negative" and "layers.0.mlp.up_proj" in name:
            out["weight_scale"] = -out["weight_scale"]
        return out
    _write_fp8_checkpoint(helpers, tmp_path, quant, corrupt)
    with pytest.raises(ValueError, match=message):
        _load(tmp_path, quant)


@pytest.mark.parametrize("config, on_the_fly, message", [
    ({"quant_method": "fp8", "fmt": "e5m2"}, False, "E4M3"),
    ({"quant_method": "fp8", "activation_scheme": "static"}, True, "dynamic"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"}, False, "dynamic"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, False, "weight_block_size"),
    ({"quant_method": "int8"}, False, "compressed-tensors"),
])
def test_config_errors(config, on_the_fly, message):
    cls = Int8Config if config["quant_method"] == "int8" else Fp8Config
    with pytest.raises(ValueError, match=message):
        cls.from_config(config, on_the_fly)


# ---- the embedded model, quantized on the fly ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_resident_bits_per_weight(embedded_source, method):
    model = build_model(embedded_source, torch.float32, CPU, quant_config=get_quant_config(method, None))
    weights = bytes_ = theory = 0
    for module in model.modules():
        if isinstance(module, Linear) and module.prefix != "lm_head":
            weights += module.weight.numel()
            bytes_ += sum(p.numel() * p.element_size() for p in module.parameters())
            theory += module.weight.numel() + 4 * module.output_size  # 8-bit codes + one fp32 scale per channel
    bits = 8 * bytes_ / weights
    print(f"{method}: {bits:.4f} bits/weight resident, {bytes_ / theory:.4f} x theory")
    assert abs(bytes_ / theory - 1) < 0.05 and bits < 8.1, bits
    assert model.lm_head.weight.dtype == torch.float32  # tied to the embedding: never quantized


PROMPTS = ["The capital of France is", "def fibonacci(n):", "The three primary colors are"]


def _generate(**kwargs) -> tuple[list[tuple[list[int], list[int]]], torch.nn.Module]:
    """Greedy 64 tokens for PROMPTS -> ([(prompt ids, generated ids)], the model)."""
    from quantkit import LLM, SamplingParams
    llm = LLM("smollm2-135m", device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64, **kwargs)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=64, temperature=0), use_tqdm=False)
    return [(o.prompt_token_ids, o.outputs[0].token_ids) for o in outs], llm.llm_engine.model


@pytest.fixture(scope="module")
def unquantized_run():
    return _generate()


@pytest.mark.slow
@pytest.mark.parametrize("method, floor", [("fp8", 0.9), ("int8", 0.85)])
def test_on_the_fly_end_to_end_agreement(unquantized_run, helpers, method, floor):
    """Greedy 64 tokens vs the unquantized model. Free-running greedy text diverges for good after its first
    flip, so the floor is on teacher-forced top-1 agreement over the unquantized run's own text."""
    ref_runs, ref_model = unquantized_run
    runs, model = _generate(quantization=method)
    first, same, total = [], 0, 0
    for (_, ref), (_, ours) in zip(ref_runs, runs):
        first.append(next((j for j, (a, b) in enumerate(zip(ref, ours)) if a != b), min(len(ref), len(ours))))
        same += sum(a == b for a, b in zip(ref, ours))
        total += len(ref)
    seqs = [torch.tensor(prompt + ref) for prompt, ref in ref_runs]
    forced = (helpers.ours_logits(model, seqs).argmax(-1) == helpers.ours_logits(ref_model, seqs).argmax(-1))
    print(f"{method}: first divergence at {first} of 64, identical tokens {same / total:.1%}, "
          f"teacher-forced top-1 agreement {forced.float().mean():.1%}")
    assert min(first) >= 1 and forced.float().mean() >= floor


@pytest.mark.slow
def test_fp8_weights_with_fp8_kv_cache_run(unquantized_run):
    runs, _ = _generate(quantization="fp8", kv_cache_dtype="fp8_e4m3")
    assert all(out and out[0] == ref[0] for (_, out), (_, ref) in zip(runs, unquantized_run[0]))
