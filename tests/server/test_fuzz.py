"""Hypothesis-generated bodies (valid fields, wrong types, out-of-range and huge numbers, unknown keys, raw bytes)
against the completion and chat endpoints: never a 5xx, every error in OpenAI's shape, and the server keeps
serving. Generation lengths stay tiny so each valid example costs a few decode steps."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from tests.server.conftest import MODEL

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "quantkit-hypothesis")  # no .hypothesis/ in the repo

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

HUGE = st.sampled_from([10**6, 2**63, -(2**63) - 1, 10**30])
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | HUGE | st.floats(allow_nan=False, width=32) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


SAMPLING = {
    "model": st.just(MODEL) | st.text(max_size=8),
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 100000),
    "min_p": st.floats(0, 1),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 49151), max_size=3),
    "stream": st.booleans(),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.1, 100),
    "min_tokens": st.integers(0, 2),
    "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "return_token_ids": st.booleans(),
    "user": st.text(max_size=5),
}
COMPLETION = {
    **SAMPLING,
    "prompt": st.text(min_size=1, max_size=40) | st.lists(st.integers(0, 49151), min_size=1, max_size=6)
    | st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3)
    | st.lists(st.lists(st.integers(0, 49151), min_size=1, max_size=4), min_size=1, max_size=2),
    "max_tokens": st.integers(1, 4),
    "logprobs": st.integers(0, 20),
    "echo": st.booleans(),
}
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"])},
    optional={"content": st.text(max_size=30) | st.lists(st.fixed_dictionaries(
        {"type": st.just("text"), "text": st.text(max_size=10)}), max_size=2), "name": st.text(max_size=5)})
CHAT = {
    **SAMPLING,
    "messages": st.lists(MESSAGE, min_size=1, max_size=3),
    "max_tokens": st.integers(1, 4),
    "max_completion_tokens": st.integers(1, 4),
    "logprobs": st.booleans(),
    "add_generation_prompt": st.booleans(),
}


def bodies(fields: dict, required: tuple[str, ...]) -> st.SearchStrategy:
    """Half valid bodies (any mix of the fields, each in its documented range: 200s, or a 400 where fields
    conflict), half hostile ones (any field may also hold any JSON - wrong types, out-of-range and huge numbers,
    unknown keys: 400s). `required` keys are always present; max_tokens is never null, because a chat without
    it may fill the context, which is slow and tests nothing more."""
    def build(hostile: bool) -> st.SearchStrategy:
        def value(key: str) -> st.SearchStrategy:
            if not hostile:
                return fields[key]
            anything = ANY_JSON.filter(lambda v: v is not None) if key == "max_tokens" else ANY_JSON
            return st.one_of(fields[key], anything)
        optional = {k: value(k) for k in fields if k not in required}
        if hostile:
            optional.update(bogus_field=ANY_JSON, stream_options=ANY_JSON, logit_bias=ANY_JSON,
                            response_format=ANY_JSON, tools=ANY_JSON, best_of=ANY_JSON, suffix=ANY_JSON)
        return st.fixed_dictionaries({k: value(k) for k in required}, optional=optional)
    return build(False) | build(True)


def check(http, path: str, content: bytes) -> None:
    r = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (content, r.status_code, r.text)
    if r.status_code != 200:
        error = r.json()["error"]
        assert error["message"] and error["type"], r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n"), r.text[-200:]
    elif path.startswith("/v1"):
        assert "choices" in r.json()


@SETTINGS
@given(body=bodies(COMPLETION, ("prompt", "max_tokens")))
def test_fuzz_completions(http, body):
    check(http, "/v1/completions", json.dumps(body).encode())


@SETTINGS
@given(body=bodies(CHAT, ("messages", "max_tokens")))
def test_fuzz_chat(http, body):
    check(http, "/v1/chat/completions", json.dumps(body).encode())


@settings(SETTINGS, max_examples=20)
@given(raw=st.binary(max_size=40) | ANY_JSON.map(lambda v: json.dumps(v).encode()),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]))
def test_fuzz_raw_bodies(http, raw, path):
    check(http, path, raw)


def test_still_serving_after_fuzz(http):
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
