"""Calibration and held-out token windows for `quantkit quantize` and the evaluation harness.

Window rule (vLLM / AutoGPTQ style): documents are shuffled with the seed, each is tokenized without special tokens
(a chat template already carries its own), the token streams are concatenated with the tokenizer's EOS between
documents, and the stream is cut into consecutive non-overlapping windows of exactly `seqlen` tokens; the first
`nsamples` windows are the result, a LongTensor [nsamples, seqlen]. Only as many documents as needed are tokenized.

ShareGPT split: a conversation that ShareGPT cut into parts shares its id stem ('hRPPgZT_0', 'hRPPgZT_11'), so
the split is over stems. The stems are shuffled with a FIXED seed (independent of the calibration seed) and the
first CALIBRATION_FRACTION of them form the calibration pool, the rest the held-out pool; calibration with any
seed therefore never sees a held-out conversation.

User files: a `.jsonl` file holds one document per line, `{"text": ...}` or `{"messages": [{"role", "content"}]}`
(rendered through the chat template); any other file is plain text whose documents are its blank-line-separated
paragraphs.
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError

from quantkit.harness.workload import load_sharegpt

SHAREGPT = "sharegpt"
CALIBRATION_FRACTION = 0.9
SPLIT_SEED = 1234
ROLES = {"human": "user", "gpt": "assistant"}
_TOKENIZE_BATCH = 64


@dataclass(frozen=True)
class CalibrationConfig:
    """source: "sharegpt" or a path to a text / JSONL file."""
    source: str | Path = SHAREGPT
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.source, (str, Path)) or not str(self.source):
            raise ValueError(f"source must be {SHAREGPT!r} or a file path, got {self.source!r}")
        for name in ("nsamples", "seqlen"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")


@dataclass
class Windows:
    """input_ids [nsamples, seqlen] int64, and the ids of the documents whose tokens they hold (in order)."""
    input_ids: torch.Tensor
    doc_ids: list[str]


@dataclass
class Document:
    id: str
    text: str


def render_chat(tokenizer: Any, messages: list[dict]) -> str:
    """One conversation as the model sees it. A tokenizer without a chat template gets the turns joined by
    blank lines (base models)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "\n\n".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, tokenize=False)


def sharegpt_messages(record: dict) -> list[dict]:
    """ShareGPT turns as chat messages: human -> user, gpt -> assistant, other roles (system, bing...) skipped."""
    return [{"role": ROLES[turn["from"]], "content": turn["value"]}
            for turn in record.get("conversations", []) if turn.get("from") in ROLES]


def sharegpt_split() -> tuple[list[dict], list[dict]]:
    """(calibration pool, held-out pool) of ShareGPT records with at least one user/assistant turn, duplicates
    of an id dropped; the two pools share no conversation (id stem), whatever seed samples from them."""
    records, seen = [], set()
    for record in load_sharegpt():
        if record["id"] not in seen and sharegpt_messages(record):
            seen.add(record["id"])
            records.append(record)
    stems = sorted({conversation_stem(r["id"]) for r in records})
    random.Random(SPLIT_SEED).shuffle(stems)
    calibration_stems = set(stems[:int(len(stems) * CALIBRATION_FRACTION)])
    calibration = [r for r in records if conversation_stem(r["id"]) in calibration_stems]
    heldout = [r for r in records if conversation_stem(r["id"]) not in calibration_stems]
    return calibration, heldout


def conversation_stem(record_id: str) -> str:
    """'hRPPgZT_11' -> 'hRPPgZT': the parts of one ShareGPT conversation share it."""
    return record_id.rsplit("_", 1)[0]


def _sharegpt_documents(tokenizer: Any, records: list[dict]) -> Iterator[Document]:
    """Rendered conversations; one the chat template rejects (e.g. 'roles must alternate' after a skipped turn)
    is left out."""
    for record in records:
        try:
            yield Document(record["id"], render_chat(tokenizer, sharegpt_messages(record)))
        except TemplateError:
            continue


def file_documents(tokenizer: Any, path: Path) -> list[Document]:
    """A user's calibration file as documents (see the module docstring for the formats)."""
    if not path.is_file():
        raise ValueError(f"calibration file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        docs = [_jsonl_document(tokenizer, path, i, line) for i, line in enumerate(text.splitlines(), 1)
                if line.strip()]
    else:
        docs = [Document(f"paragraph {i}", p.strip()) for i, p in enumerate(re.split(r"\n\s*\n", text), 1)
                if p.strip()]
    if not docs:
        raise ValueError(f"calibration file {str(path)!r} is empty")
    return docs


def _jsonl_document(tokenizer: Any, path: Path, lineno: int, line: str) -> Document:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return Document(f"line {lineno}", obj["text"])
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        return Document(f"line {lineno}", render_chat(tokenizer, obj["messages"]))
    raise ValueError(f'{path}:{lineno}: expected an object with "text" (string) or "messages" (list)')


def token_windows(tokenizer: Any, documents: Iterable[Document], nsamples: int, seqlen: int,
                  what: str) -> Windows:
    """The window rule over documents already in sampling order; raises when they hold fewer than
    nsamples * seqlen tokens (saying how many they hold)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to separate calibration documents")
    need, stream, doc_ids = nsamples * seqlen, [], []
    docs = iter(documents)
    while len(stream) < need:
        batch = list(islice(docs, _TOKENIZE_BATCH))
        if not batch:
            raise ValueError(f"{what} holds {len(stream)} tokens, fewer than nsamples x seqlen = "
                             f"{nsamples} x {seqlen} = {need}")
        for doc, ids in zip(batch, tokenizer([d.text for d in batch], add_special_tokens=False).input_ids):
            if len(stream) >= need:
                break
            stream += (ids + [tokenizer.eos_token_id])
            doc_ids.append(doc.id)
    return Windows(torch.tensor(stream[:need], dtype=torch.long).view(nsamples, seqlen), doc_ids)


def _sample(tokenizer: Any, pool: list[dict], config: CalibrationConfig, what: str) -> Windows:
    random.Random(config.seed).shuffle(pool)
    return token_windows(tokenizer, _sharegpt_documents(tokenizer, pool), config.nsamples, config.seqlen, what)


def calibration_windows(tokenizer: Any, config: CalibrationConfig) -> Windows:
    """The calibration set of `config` with the ids of the documents it drew on."""
    if config.source == SHAREGPT:
        return _sample(tokenizer, sharegpt_split()[0], config, "the ShareGPT calibration pool")
    docs = file_documents(tokenizer, Path(config.source).expanduser())
    random.Random(config.seed).shuffle(docs)
    return token_windows(tokenizer, docs, config.nsamples, config.seqlen,
                         f"calibration file {str(config.source)!r}")


def calibration_data(tokenizer: Any, config: CalibrationConfig) -> torch.Tensor:
    """The calibration set: LongTensor [nsamples, seqlen]."""
    return calibration_windows(tokenizer, config).input_ids


def heldout_windows(tokenizer: Any, nsamples: int, seqlen: int, seed: int = 0) -> Windows:
    """Evaluation windows from the ShareGPT held-out pool (never calibrated on, whatever the seeds);
    `.input_ids` is [nsamples, seqlen]."""
    config = CalibrationConfig(SHAREGPT, nsamples, seqlen, seed)  # validates the arguments
    return _sample(tokenizer, sharegpt_split()[1], config, "the ShareGPT held-out pool")
