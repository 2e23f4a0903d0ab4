"""200 concurrent streaming clients on loopback, a fifth of them hanging up mid-stream: every finished stream is
well formed and self-consistent, /health answers throughout, and afterwards every KV block is free again."""
from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

from tests.server.conftest import MODEL, metric

NUM_CLIENTS = 200
PROMPTS = ["Hello", "The capital of France is", "Write a haiku about the sea.", "1, 2, 3,",
           "Explain why the sky is blue in one sentence, please, and be brief about it.", "def fib(n):"]


async def _client(http: httpx.AsyncClient, i: int, rng: random.Random) -> dict:
    disconnect = i % 5 == 0
    max_tokens = 64 if disconnect else rng.randint(4, 8)
    body = {"model": MODEL, "prompt": f"{rng.choice(PROMPTS)} ({i})", "max_tokens": max_tokens, "stream": True,
            "temperature": rng.choice([0.0, 0.8]), "seed": i, "ignore_eos": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    events, text, ids = [], "", []
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            events.append(line.removeprefix("data: "))
            if events[-1] == "[DONE]":
                break
            chunk = json.loads(events[-1])
            for choice in chunk["choices"]:
                text += choice["text"]
                ids += choice["token_ids"]
            if disconnect and ids:
                return {"disconnected": True}  # leaving the block closes the connection mid-stream
    return {"disconnected": False, "events": events, "text": text, "ids": ids, "max_tokens": max_tokens}


async def _poll_health(http: httpx.AsyncClient, stop: asyncio.Event) -> list[tuple[int, float]]:
    seen = []
    while not stop.is_set():
        start = time.monotonic()
        r = await http.get("/health")
        seen.append((r.status_code, time.monotonic() - start))
        await asyncio.sleep(0.2)
    return seen


async def _run(server) -> tuple[list[dict], list[tuple[int, float]], float]:
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=NUM_CLIENTS + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120, limits=limits) as http:
        stop = asyncio.Event()
        health = asyncio.create_task(_poll_health(http, stop))
        start = time.monotonic()
        results = await asyncio.gather(*(_client(http, i, rng) for i in range(NUM_CLIENTS)))
        elapsed = time.monotonic() - start
        stop.set()
        return results, await health, elapsed


def _settled(http: httpx.Client, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = http.get("/metrics").text
        free, total = metric(text, "quantkit:kv_cache_free_blocks"), metric(text, "quantkit:kv_cache_total_blocks")
        busy = sum(metric(text, f"quantkit:{n}") for n in ("num_requests_running", "num_requests_waiting",
                                                           "num_requests_in_flight"))
        if (free == total and busy == 0) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def test_200_concurrent_streams_with_disconnects(server, http):
    tokenizer = server.engine.engine.tokenizer
    aborted_before = _aborted(http.get("/metrics").text)
    results, health, elapsed = asyncio.run(_run(server))
    assert elapsed < 120, f"the load test took {elapsed:.0f} s"
    completed = [r for r in results if not r["disconnected"]]
    assert len(completed) == NUM_CLIENTS * 4 // 5
    for r in completed:
        assert r["events"][-1] == "[DONE]"
        final = json.loads(r["events"][-2])
        assert final["choices"] == [] and final["usage"]["completion_tokens"] == r["max_tokens"]
        assert len(r["ids"]) == r["max_tokens"]
        assert r["text"] == tokenizer.decode(r["ids"], skip_special_tokens=True)
        assert json.loads(r["events"][-3])["choices"][0]["finish_reason"] == "length"
    assert len(health) >= 3 and all(status == 200 for status, _ in health), health
    text = _settled(http)
    assert metric(text, "quantkit:kv_cache_free_blocks") == metric(text, "quantkit:kv_cache_total_blocks")
    assert metric(text, "quantkit:num_requests_running") == metric(text, "quantkit:num_requests_waiting") == 0
    # a client that read its first token late may find its request already done: nearly all are aborts
    assert NUM_CLIENTS // 5 - 2 <= _aborted(text) - aborted_before <= NUM_CLIENTS // 5
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "Still here?", "max_tokens": 2}) \
        .status_code == 200


def _aborted(text: str) -> float:
    for line in text.splitlines():
        if line.startswith("quantkit:request_success_total{") and 'finished_reason="abort"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
