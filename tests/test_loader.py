"""Checkpoint loading: every way a checkpoint can be wrong raises a ValueError that names the file and/or tensor;
sharded checkpoints load; names resolve (or fail saying what was looked for); dummy presets."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.checkpoint.resolve import ModelSource, resolve_model
from quantkit.config import ModelConfig
from quantkit.kernels.attention_torch import TorchAttentionBackend
from quantkit.models.llama import LlamaForCausalLM
from quantkit.models.loader import build_model

CPU = torch.device("cpu")
ST = "model.safetensors"


def load(path):
    return build_model(resolve_model(str(path)), torch.float32, CPU)


@pytest.fixture
def ckpt(tmp_path, small_llama_dir):
    """A private copy of the small Llama checkpoint, and a function that rewrites its tensors."""
    path = tmp_path / "model"
    shutil.copytree(small_llama_dir, path)

    def edit(fn):
        tensors = load_file(str(path / ST))
        fn(tensors)
        save_file(tensors, str(path / ST), metadata={"format": "pt"})
        return path
    return path, edit


def test_good_checkpoint_loads_every_tensor(small_llama_dir):
    model = load(small_llama_dir)
    tensors = load_file(str(small_llama_dir / ST))
    qkv = model.model.layers[1].self_attn.qkv_proj.weight
    q, k, v = (tensors[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(qkv, torch.cat([q, k, v]))
    gate_up = model.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(gate_up, torch.cat([tensors["model.layers.0.mlp.gate_proj.weight"],
                                           tensors["model.layers.0.mlp.up_proj.weight"]]))
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])


@pytest.mark.parametrize("name", ["model.layers.1.mlp.down_proj.weight", "model.norm.weight",
                                  "model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight"])
def test_missing_tensor(ckpt, name):
    path, edit = ckpt
    edit(lambda t: t.pop(name))
    with pytest.raises(ValueError, match="missing tensors") as e:
        load(path)
    assert name in str(e.value) and str(path) in str(e.value)


def test_unexpected_tensor(ckpt):
    path, edit = ckpt
    edit(lambda t: t.update({"model.layers.0.self_attn.extra_proj.weight": torch.zeros(4, 4)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model.layers.0.self_attn.extra_proj.weight'") as e:
        load(path)
    assert ST in str(e.value)


def test_ignored_tensors_are_skipped(ckpt):
    path, edit = ckpt
    edit(lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}))
    load(path)


@pytest.mark.parametrize("name,shape", [("model.layers.0.self_attn.q_proj.weight", (63, 64)),
                                        ("model.layers.1.mlp.down_proj.weight", (64, 95)),
                                        ("model.embed_tokens.weight", (255, 64))])
def test_wrong_shape(ckpt, name, shape):
    path, edit = ckpt
    edit(lambda t: t.update({name: torch.zeros(shape)}))
    with pytest.raises(ValueError, match="does not match the expected") as e:
        load(path)
    assert name in str(e.value) and ST in str(e.value) and str(tuple(shape)) in str(e.value)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float8_e4m3fn])
def test_wrong_dtype(ckpt, dtype):
    path, edit = ckpt
    name = "model.layers.1.mlp.down_proj.weight"
    edit(lambda t: t.update({name: t[name].to(dtype)}))
    with pytest.raises(ValueError, match=rf"{name}.*dtype {dtype}"):
        load(path)


def test_other_float_dtypes_convert(ckpt):
    path, edit = ckpt
    edit(lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    model = load(path)
    assert model.lm_head.weight.dtype == torch.float32
    assert torch.equal(model.lm_head.weight, load_file(str(path / ST))["lm_head.weight"].float())


def test_duplicate_tensor_across_files(ckpt):
    path, _ = ckpt
    save_file({"model.norm.weight": torch.ones(64)}, str(path / "model-extra.safetensors"))
    with pytest.raises(ValueError, match=r"'model.norm.weight' appears twice"):
        load(path)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors(ckpt, keep):
    path, _ = ckpt
    data = (path / ST).read_bytes()
    (path / ST).write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated") as e:
        load(path)
    assert str(path / ST) in str(e.value)


def test_no_safetensors_files(ckpt):
    path, _ = ckpt
    (path / ST).rename(path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*\.safetensors files"):
        load(path)


def test_sharded_checkpoint_loads(tmp_path, small_llama_dir, helpers):
    hf = helpers.make_hf_model(tmp_path / "whole", "llama", seed=1)
    hf.save_pretrained(str(tmp_path / "sharded"), safe_serialization=True, max_shard_size="60KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    seqs = helpers.random_seqs([11, 7], 256)
    whole = helpers.ours_logits(load(tmp_path / "whole"), seqs)
    sharded = helpers.ours_logits(load(tmp_path / "sharded"), seqs)
    assert torch.equal(whole, sharded)
    assert helpers.max_rel_err(sharded, helpers.hf_logits(hf, seqs)) <= 1e-4


@pytest.fixture
def sharded(tmp_path, helpers):
    path = tmp_path / "sharded"
    helpers.make_hf_model(tmp_path / "whole", "llama", seed=1).save_pretrained(
        str(path), safe_serialization=True, max_shard_size="60KB")
    return path


def test_sharded_index_names_missing_shard(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ValueError, match="shard files that do not exist") as e:
        load(sharded)
    assert victim.name in str(e.value) and "model.safetensors.index.json" in str(e.value)


def test_sharded_index_invalid(sharded):
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="model.safetensors.index.json: not a valid shard index"):
        load(sharded)


def _write_config(ckpt, **changes):
    path, _ = ckpt
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_unsupported_architecture(ckpt):
    path = _write_config(ckpt, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match=r"unsupported architecture \['GPT2LMHeadModel'\]"):
        load(path)


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},
                                  {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}])
def test_unsupported_rope_type(ckpt, rope):
    path = _write_config(ckpt, rope_parameters=rope)
    with pytest.raises(ValueError, match=rf"rope_type='{rope['rope_type']}' is not supported"):
        load(path)


def test_missing_config_field():
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8,
                             "num_hidden_layers": 1, "num_attention_heads": 1})


def test_heads_not_multiple_of_kv_heads(ckpt):
    path = _write_config(ckpt, num_attention_heads=4, num_key_value_heads=3, head_dim=16)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        load(path)


# --- resolving names ----------------------------------------------------------------------------------------------

def test_unknown_model_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="model 'no-such-model' not found") as e:
        resolve_model("no-such-model")
    msg = str(e.value)
    assert "Looked for" in msg and "smollm2-135m" in msg and "config.json" in msg and ".gguf" in msg
    assert "never downloads" in msg


def test_directory_without_config(tmp_path):
    (tmp_path / ST).write_bytes(b"")
    with pytest.raises(ValueError, match="not found"):
        resolve_model(str(tmp_path))


def test_bad_load_format():
    with pytest.raises(ValueError, match="load_format='pickle'"):
        resolve_model("smollm2-135m", "pickle")


def test_dummy_preset_needs_dummy_load_format(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="load_format='dummy'"):
        resolve_model("llama3-8b")
    source = resolve_model("llama3-8b", "dummy")
    with pytest.raises(ValueError, match="shape preset: pass load_format='dummy'"):
        build_model(source, torch.float32, CPU)


# --- dummy weights ------------------------------------------------------------------------------------------------

def test_llama3_8b_dummy_config_shapes():
    source = resolve_model("llama3-8b", "dummy")
    assert source.path is None
    cfg = ModelConfig.from_hf(source.hf_config)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (4096, 14336, 32)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 8, 128)
    assert (cfg.vocab_size, cfg.rope.theta, cfg.tie_word_embeddings) == (128256, 500000.0, False)
    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(cfg, torch.bfloat16, None, TorchAttentionBackend())
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248  # Meta-Llama-3-8B
    assert model.model.layers[0].self_attn.qkv_proj.weight.shape == (4096 + 2 * 1024, 4096)


def test_smollm2_dummy_weights(helpers):
    model = build_model(resolve_model("smollm2-135m", "dummy"), torch.float32, CPU, dummy=True, seed=3)
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == 134_515_008  # tied head counted once
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    qkv = params["model.layers.5.self_attn.qkv_proj.weight"]
    assert abs(qkv.std().item() - (3 * 576) ** -0.5) < 0.02 * (3 * 576) ** -0.5  # U(+-1/sqrt(in))
    assert qkv.abs().max().item() <= 576 ** -0.5
    down = params["model.layers.5.mlp.down_proj.weight"]
    assert abs(down.std().item() - (3 * 1536) ** -0.5) < 0.02 * (3 * 1536) ** -0.5
    assert abs(params["model.embed_tokens.weight"].std().item() - 0.02) < 1e-3
    assert torch.equal(params["model.norm.weight"], torch.ones(576))
    seqs = helpers.random_seqs([9, 5], 49152)
    logits = helpers.ours_logits(model, seqs)
    assert torch.isfinite(logits).all() and logits.std() > 1e-3


def test_dummy_weights_are_seeded(helpers):
    source = ModelSource("tiny", None, {"architectures": ["LlamaForCausalLM"], **helpers.SMALL})
    a, b, c = (build_model(source, torch.float32, CPU, dummy=True, seed=s) for s in (5, 5, 6))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


def test_weight_bytes_counts_kernel_tensors_and_each_storage_once():
    """A kernel's derived tensors (the W4 GEMM's reordered weight) count; views and tied tensors count once."""
    from types import SimpleNamespace

    from quantkit.kernels.base import KernelPlan, LinearKernel
    from quantkit.models.loader import weight_bytes

    layer = torch.nn.Linear(8, 4, bias=False)  # 32 fp32 = 128 bytes
    kernel = LinearKernel(layer, method=None)
    kernel.derived = torch.zeros(10, dtype=torch.int32)                  # 40 bytes
    kernel.tables = SimpleNamespace(view=layer.weight.detach()[:2], extra=torch.zeros(3, dtype=torch.int64))  # 0 + 24
    layer.quant_method = SimpleNamespace(kernels=KernelPlan([kernel, kernel], [16]))
    assert weight_bytes(layer) == 128 + 40 + 24
