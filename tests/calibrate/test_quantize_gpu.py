"""`quantize(..., device="cuda")`: the layers are computed on the GPU and the checkpoint is as good as the CPU
run's (same method and calibration; float differences move a few rounding decisions, so the checkpoints are
compared by their error against the float model, not bit for bit)."""
from __future__ import annotations

import pytest
import torch

from quantkit import LLM
from quantkit.calibrate.config import QuantizeConfig
from quantkit.calibrate.pipeline import load_summary, quantize
from quantkit.layers.attention import AttentionMetadata

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def word_model(tmp_path_factory, helpers):
    """A random Llama with a word-level tokenizer built in place (no tokenizer files needed on the GPU host)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    path = tmp_path_factory.mktemp("word_model")
    words = [f"w{i}" for i in range(250)]
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(str(path))
    helpers.make_hf_model(path, "llama", seed=4, vocab_size=256, hidden_size=256, intermediate_size=512,
                          num_attention_heads=4, num_key_value_heads=4)
    gen = torch.Generator().manual_seed(0)
    text = "\n\n".join(" ".join(words[j] for j in torch.randint(0, 250, (40,), generator=gen)) for _ in range(200))
    (path / "calib.txt").write_text(text)
    return path


@pytest.mark.parametrize("method", ["gptq", "awq", "int8"])
def test_cuda_quantization_matches_cpu(word_model, tmp_path, method):
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / device
        quantize(QuantizeConfig(str(word_model), method, outs[device], group_size=64, device=device,
                                calibration=str(word_model / "calib.txt"), nsamples=8, seqlen=64))
    ids = torch.randint(2, 252, (2, 32), generator=torch.Generator().manual_seed(1))
    logits = {}
    outs["float"] = word_model
    for device, path in outs.items():
        model = LLM(str(path), device="cpu", skip_tokenizer_init=True, num_kv_blocks=16).llm_engine.model
        with torch.no_grad():
            hidden = model(ids.reshape(-1), torch.arange(32).repeat(2), AttentionMetadata.for_prefill([32, 32]))
            logits[device] = model.compute_logits(hidden)
    err = {d: float((logits[d] - logits["float"]).pow(2).mean()) for d in ("cpu", "cuda")}
    assert abs(err["cuda"] - err["cpu"]) <= 0.15 * err["cpu"], err
    summaries = {d: load_summary(outs[d])["layers"] for d in ("cpu", "cuda")}
    for cpu, cuda in zip(summaries["cpu"], summaries["cuda"]):
        assert cuda["relative_error"] == pytest.approx(cpu["relative_error"], rel=0.1)
