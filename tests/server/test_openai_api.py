"""The server through the official `openai` client and raw HTTP: completions and chat, streaming and not, n > 1,
stop, seeds, logprobs, usage, echo, tokenize, SSE framing, API key, and OpenAI-shaped errors for bad input."""
from __future__ import annotations

import json

import openai
import pytest

from tests.server.conftest import MODEL, metric

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _stream_texts(stream, n: int) -> tuple[list[str], object]:
    texts, usage = [""] * n, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else (choice.delta.content or "")
            texts[choice.index] += piece
    return texts, usage


def test_models_health_metrics_and_api_key(server, http, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    bare = {"Authorization": ""}
    assert http.get("/health", headers=bare).status_code == 200
    assert http.get("/metrics", headers=bare).status_code == 200
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": server.key}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
            r = http.request(method, path, headers=headers, content=b"{not json")
            assert r.status_code == 401, (headers, path, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="hi", max_tokens=1)


def test_completion_answers_with_usage(http, client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert "Paris" in choice.text and choice.finish_reason == "length"
    prompt_tokens = http.post("/tokenize", json={"prompt": "The capital of France is"}).json()["count"]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (prompt_tokens, 6, prompt_tokens + 6)
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert "Paris" in chat.choices[0].message.content and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 12 and chat.usage.prompt_tokens > 5


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_equals_non_stream_for_a_seed(client, endpoint):
    """n=2 sampled completions: with the same seed, a second (streamed) request reproduces the first one's texts
    delta by delta, and its usage agrees; the two completions differ (seed + index)."""
    args = {"model": MODEL, "max_tokens": 8, "temperature": 1.0, "n": 2, "seed": 7}
    if endpoint == "completions":
        create, args = client.completions.create, {**args, "prompt": "My favourite word is"}
        whole = create(**args)
        texts = [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    else:
        create, args = client.chat.completions.create, {**args, "messages": CHAT}
        whole = create(**args)
        texts = [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    streamed, usage = _stream_texts(create(**args, stream=True, stream_options={"include_usage": True}), 2)
    assert streamed == texts and texts[0] != texts[1]
    assert usage == whole.usage


def test_stop_string_cuts_the_text(client):
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[len(base) // 2:len(base) // 2 + 2]
    assert stop.strip(), base
    args = {"model": MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 10, "temperature": 0, "stop": [stop]}
    out = client.completions.create(**args).choices[0]
    assert out.text == base[:base.index(stop)] and out.finish_reason == "stop"
    streamed, _ = _stream_texts(client.completions.create(**args, stream=True), 1)
    assert streamed == [out.text]


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0,
                                    logprobs=3).choices[0]
    lp = out.logprobs
    assert "".join(lp.tokens) == out.text and len(lp.tokens) == 5
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and token in top and len(top) <= 4
        assert value == pytest.approx(max(top.values()))  # greedy picks the most likely token
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=3).choices[0]
    content = chat.logprobs.content
    assert "".join(c.token for c in content) == chat.message.content
    for c in content:
        values = [t.logprob for t in c.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert c.top_logprobs[0].token == c.token and bytes(c.bytes).decode() == c.token
    echoed = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=2, temperature=0, echo=True,
                                       logprobs=1).choices[0]
    assert echoed.text.startswith("Hello there") and echoed.logprobs.token_logprobs[0] is None
    assert "".join(echoed.logprobs.tokens) == echoed.text


def test_multiple_prompts_and_token_ids(http, client):
    ids = http.post("/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=["Hello", "The capital of France is"], n=2, max_tokens=3,
                                    temperature=0)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == next(c.text for c in out.choices if c.index == 2)


def test_sse_framing_raw(http):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, "stream": True, "n": 2,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert {c["choices"][0]["delta"].get("role") for c in chunks[:2]} == {"assistant"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert len(finishes) == 2 and chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 8


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 33}, 400, None),  # above max_num_seqs=32
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "unknown_field": 1}, 400, "unknown_field"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 600}, 400, "max_tokens"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/nothing", {}, 404, None),
])
def test_bad_input_is_an_openai_error(http, path, body, status, param):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_too_long_prompt_and_malformed_json(http, client):
    r = http.post("/v1/completions", json={"prompt": "hello " * 600, "max_tokens": 4})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "512" in message and "601 in the prompt" in message
    for raw in (b"{", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"prompt": "hi", "temperature": NaN}'):
        r = http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "error" in r.json(), raw
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, logit_bias={"1": 1.0})
    assert client.completions.create(model=MODEL, prompt="still fine", max_tokens=2).choices[0].text
    nulls = {"prompt": "nulls mean defaults", "max_tokens": 2, "temperature": None, "n": None, "stream": None}
    assert http.post("/v1/completions", json=nulls).status_code == 200


def test_metrics_count_requests(server, http, client):
    before = http.get("/metrics").text
    client.completions.create(model=MODEL, prompt="Count me", max_tokens=3, extra_body={"ignore_eos": True})
    after = http.get("/metrics").text
    assert metric(after, "quantkit:generation_tokens_total") - metric(before, "quantkit:generation_tokens_total") == 3
    assert metric(after, "quantkit:e2e_request_latency_seconds_count") > \
        metric(before, "quantkit:e2e_request_latency_seconds_count")
    for name in ("quantkit:num_requests_running", "quantkit:num_requests_waiting", "quantkit:kv_cache_usage_perc",
                 "quantkit:prefix_cache_hit_rate", "quantkit:num_preemptions_total",
                 "quantkit:time_to_first_token_seconds_count", "quantkit:time_per_output_token_seconds_count",
                 "quantkit:prompt_tokens_total"):
        metric(after, name)
