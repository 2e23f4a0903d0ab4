"""Calibration windows: the ShareGPT default (chat template, seeded, disjoint from the held-out split), user text
and JSONL files, and the error paths."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from quantkit.calibrate.data import (
    CalibrationConfig,
    calibration_data,
    calibration_windows,
    conversation_stem,
    heldout_windows,
    sharegpt_messages,
    sharegpt_split,
)
from quantkit.checkpoint.resolve import resolve_model

SMALL = {"nsamples": 4, "seqlen": 64}


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)


@pytest.fixture(scope="module")
def sharegpt_pools():
    return sharegpt_split()


@pytest.fixture(scope="module")
def sharegpt_seed0(tokenizer):
    return calibration_windows(tokenizer, CalibrationConfig(**SMALL, seed=0))


def test_sharegpt_windows_are_deterministic_per_seed(tokenizer, sharegpt_seed0):
    ids = sharegpt_seed0.input_ids
    assert ids.shape == (4, 64) and ids.dtype == torch.long
    assert torch.equal(calibration_data(tokenizer, CalibrationConfig(**SMALL, seed=0)), ids)
    assert not torch.equal(calibration_data(tokenizer, CalibrationConfig(**SMALL, seed=1)), ids)


def test_sharegpt_windows_use_the_chat_template_and_eos(tokenizer, sharegpt_seed0):
    start = tokenizer("<|im_start|>system", add_special_tokens=False).input_ids
    assert sharegpt_seed0.input_ids[0, :len(start)].tolist() == start
    assert "<|im_start|>user" in tokenizer.decode(sharegpt_seed0.input_ids.flatten())


def test_conversations_the_template_rejects_are_skipped(sharegpt_pools):
    strict = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    strict.chat_template = ("{% if messages|length > 2 %}{{ raise_exception('roles must alternate') }}{% endif %}"
                            "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w = calibration_windows(strict, CalibrationConfig(**SMALL, seed=0))
    by_id = {r["id"]: r for r in sharegpt_pools[0]}
    assert all(len(sharegpt_messages(by_id[i])) <= 2 for i in w.doc_ids)


def test_calibration_never_overlaps_heldout(tokenizer, sharegpt_seed0, sharegpt_pools):
    calibration, heldout = sharegpt_pools
    cal_stems = {conversation_stem(r["id"]) for r in calibration}
    held_stems = {conversation_stem(r["id"]) for r in heldout}
    assert not cal_stems & held_stems
    assert 0.05 < len(held_stems) / (len(cal_stems) + len(held_stems)) < 0.15
    held = heldout_windows(tokenizer, 4, 64, seed=0)
    assert held.input_ids.shape == (4, 64)
    assert {conversation_stem(i) for i in sharegpt_seed0.doc_ids} <= cal_stems
    assert {conversation_stem(i) for i in held.doc_ids} <= held_stems


def test_sharegpt_roles():
    record = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                {"from": "gpt", "value": "a"}, {"from": "bing", "value": "b"}]}
    assert sharegpt_messages(record) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def expected_stream(tokenizer, texts: list[str]) -> list[int]:
    """The documented rule: each document's tokens, then EOS, concatenated."""
    return [t for text in texts for t in tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]]


def test_plain_text_paragraphs(tokenizer, tmp_path):
    paragraphs = [f"Paragraph number {i} talks about topic {i * 7} in some detail." for i in range(40)]
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    w = calibration_windows(tokenizer, CalibrationConfig(str(path), nsamples=3, seqlen=32, seed=5))
    texts = [paragraphs[int(doc.split()[1]) - 1] for doc in w.doc_ids]
    assert w.input_ids.flatten().tolist() == expected_stream(tokenizer, texts)[:96]
    assert w.doc_ids != [f"paragraph {i}" for i in range(1, len(w.doc_ids) + 1)]  # shuffled by the seed
    again = calibration_data(tokenizer, CalibrationConfig(path, nsamples=3, seqlen=32, seed=5))
    assert torch.equal(again, w.input_ids)


def test_jsonl_text_and_messages(tokenizer, tmp_path):
    lines = [json.dumps({"text": f"Plain document {i} with a few words."}) for i in range(20)]
    lines += [json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                       {"role": "assistant", "content": f"Answer {i}."}]}) for i in range(20)]
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    w = calibration_windows(tokenizer, CalibrationConfig(str(path), nsamples=4, seqlen=64, seed=0))
    assert w.input_ids.shape == (4, 64)
    text = tokenizer.decode(w.input_ids.flatten())
    assert "<|im_start|>assistant\nAnswer" in text and "Plain document" in text


@pytest.mark.parametrize("kwargs,field", [({"nsamples": 0}, "nsamples"), ({"seqlen": -1}, "seqlen"),
                                          ({"seqlen": 1.5}, "seqlen"), ({"seed": -1}, "seed"),
                                          ({"source": ""}, "source"), ({"nsamples": True}, "nsamples")])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CalibrationConfig(**kwargs)


def test_file_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        calibration_data(tokenizer, CalibrationConfig(str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text("  \n\n \n")
    with pytest.raises(ValueError, match="is empty"):
        calibration_data(tokenizer, CalibrationConfig(str(tmp_path / "empty.txt")))
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(ValueError, match=r"holds \d+ tokens, fewer than nsamples x seqlen = 128 x 512 = 65536"):
        calibration_data(tokenizer, CalibrationConfig(str(tmp_path / "short.txt")))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        calibration_data(tokenizer, CalibrationConfig(str(tmp_path / "bad.jsonl")))
    (tmp_path / "wrong.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r'wrong.jsonl:1: expected an object with "text"'):
        calibration_data(tokenizer, CalibrationConfig(str(tmp_path / "wrong.jsonl")))
