"""Whole-model GPTQ: layer-sequential solve, a GPTQ checkpoint that our loader reads back exactly, and no more
output error than round-to-nearest on the same model."""
import pytest
import torch

from quantkit import LLM
from quantkit.calibrate.gptq import GPTQConfig
from quantkit.calibrate.sequential import gptq_quantize_model
from quantkit.export.rtn import quantize_model_rtn
from quantkit.layers.attention import AttentionMetadata
from quantkit.quant.wna16 import dequantize_kernel_weights


def logits(llm: LLM, ids: torch.Tensor) -> torch.Tensor:
    model = llm.llm_engine.model
    with torch.no_grad():
        n, length = ids.shape
        hidden = model(ids.reshape(-1), torch.arange(length).repeat(n), AttentionMetadata.for_prefill([length] * n))
        return model.compute_logits(hidden)


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_model_roundtrip_and_beats_rtn(hf_model_factory, tmp_path, sym):
    _, src = hf_model_factory("llama", hidden_size=128, intermediate_size=256)
    gen = torch.Generator().manual_seed(0)
    calibration = torch.randint(3, 256, (8, 48), generator=gen)
    config = GPTQConfig(bits=4, group_size=32, sym=sym)
    written = gptq_quantize_model(str(src), tmp_path / "gptq", calibration, config)
    assert len(written) == 2 * 7
    llm = LLM(str(tmp_path / "gptq"), device="cpu", skip_tokenizer_init=True, num_kv_blocks=16)
    assert llm.llm_engine.model_config.quantization_config["checkpoint_format"] == ("gptq" if sym else "gptq_v2")
    down = llm.llm_engine.model.model.layers[1].mlp.down_proj
    loaded = dequantize_kernel_weights(down.qweight, down.qzeros, down.scales, 4, 32, down.input_size)
    assert torch.allclose(loaded.t(), written["model.layers.1.mlp.down_proj"].dequantize(), atol=1e-6)
    quantize_model_rtn(src, tmp_path / "rtn", "gptq", bits=4, group_size=32, sym=sym)
    rtn = LLM(str(tmp_path / "rtn"), device="cpu", skip_tokenizer_init=True, num_kv_blocks=16)
    fp = LLM(str(src), device="cpu", skip_tokenizer_init=True, num_kv_blocks=16)
    held_out = torch.randint(3, 256, (4, 48), generator=gen)
    ref = logits(fp, held_out)
    gptq_err = (logits(llm, held_out) - ref).pow(2).mean()
    rtn_err = (logits(rtn, held_out) - ref).pow(2).mean()
    # Random weights and tokens give near-isotropic Hessians, where GPTQ can only tie RTN (measured 0.5930 vs
    # 0.5931); its margin on correlated inputs is tested per layer in test_gptq.py.
    assert gptq_err <= rtn_err, (gptq_err, rtn_err)
