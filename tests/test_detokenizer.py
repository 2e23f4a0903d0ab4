"""Incremental detokenization against full decode (multi-byte text, random ids) and stop strings."""
from __future__ import annotations

import random

import pytest

from quantkit.engine.detokenizer import IncrementalDetokenizer, StopChecker, backend_tokenizer, check_stop_strings

MULTIBYTE = "日本語のテキスト 🙂 héllo Ünïcödé 中文 😀👍🏽 ok"


@pytest.fixture(scope="session")
def tokenizer(embedded_source):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(embedded_source.path))


def stream(tokenizer, prompt, output, chunks, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    deltas, i = [], 0
    for size in chunks:
        deltas.append(detok.step(output[i : i + size], finished=i + size >= len(output)))
        i += size
    assert "".join(deltas) == detok.text and detok.token_ids == output
    return detok, deltas


def test_multibyte_text_streams_whole_characters(tokenizer):
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    prompt = tokenizer.encode("Say it:", add_special_tokens=False)
    detok, deltas = stream(tokenizer, prompt, ids, [1] * len(ids))
    assert detok.text == MULTIBYTE == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
    assert deltas.count("") >= 5  # tokens ending mid-character emit nothing until the character completes


def _random_ids(rng: random.Random, vocab: int, n: int) -> list[int]:
    # Ids under 256 are single bytes in this byte-level BPE: many start or continue a multi-byte character.
    return [rng.randrange(256) if rng.random() < 0.5 else rng.randrange(vocab) for _ in range(n)]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_equal_full_decode(tokenizer, skip_special_tokens):
    rng = random.Random(0)
    specials = tokenizer.all_special_ids
    for _ in range(150):
        prompt = _random_ids(rng, len(tokenizer), rng.randrange(0, 8))
        output = _random_ids(rng, len(tokenizer), rng.randrange(1, 25))
        output[rng.randrange(len(output))] = rng.choice(specials)
        chunks = [rng.randrange(1, 4) for _ in output]
        detok, _ = stream(tokenizer, prompt, output, chunks, skip_special_tokens)
        assert detok.text == tokenizer.decode(output, skip_special_tokens=skip_special_tokens)


def test_unfinished_stream_holds_back_an_incomplete_character(tokenizer):
    ids = tokenizer.encode("ok 日本", add_special_tokens=False)[:3]  # "ok", " " + 2 of 日's 3 bytes
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.step(ids) == "ok"  # the partial character waits for the rest
    assert detok.step([], finished=True) == " \ufffd"  # finishing shows it as a full decode does
    assert detok.text == tokenizer.decode(ids)


def test_prompt_cut_mid_character_does_not_leak_into_output(tokenizer):
    ids = tokenizer.encode("日本", add_special_tokens=False)
    assert tokenizer.decode(ids[:1]) == "\ufffd"  # the first token ends inside 日
    detok, _ = stream(tokenizer, ids[:1], ids[1:], [1] * len(ids[1:]))
    assert detok.text == tokenizer.decode(ids[1:])


def test_special_tokens_skipped_or_kept(tokenizer):
    output = tokenizer.encode("hi", add_special_tokens=False) + [tokenizer.eos_token_id]
    output += tokenizer.encode(" there", add_special_tokens=False)
    assert stream(tokenizer, [], output, [1] * len(output), True)[0].text == "hi there"
    kept = stream(tokenizer, [], output, [1] * len(output), False)[0].text
    assert kept == f"hi{tokenizer.eos_token} there"


def test_backend_tokenizer_needs_a_fast_tokenizer(tokenizer):
    assert backend_tokenizer(tokenizer) is backend_tokenizer(backend_tokenizer(tokenizer))
    with pytest.raises(ValueError, match="fast tokenizer"):
        backend_tokenizer(object())


def test_stop_string_cuts_exactly_before_or_after():
    text = "Hello world. STOP here"
    assert check_stop_strings(text, len(text), ["STOP"], False) == ("STOP", 13)
    assert check_stop_strings(text, len(text), ["STOP"], True) == ("STOP", 17)
    assert check_stop_strings(text, len(text), ["halt"], False) is None
    assert check_stop_strings(text, 0, ["STOP"], False) is None


def test_stop_search_covers_only_the_tail_that_can_hold_a_new_match():
    text = "STOP then more"
    assert check_stop_strings(text, 4, ["STOP"], False) is None  # an old match was handled when it was new
    assert check_stop_strings("abcXY", 1, ["cXY"], False) == ("cXY", 2)  # ends in the new char
    assert check_stop_strings("abcXYz", 1, ["cXY"], False) is None


def test_earliest_stop_string_wins():
    text = "one two three"
    assert check_stop_strings(text, len(text), ["three", "two"], False) == ("two", 4)


def _stream_with_stops(deltas: list[str], checker: StopChecker) -> tuple[str, list[str], str | None]:
    """The output processor's loop: append, check, truncate on a match, emit what the hold-back allows."""
    text, emitted, chunks, reason = "", 0, [], None
    for i, delta in enumerate(deltas):
        text += delta
        match = checker.check(text, len(delta))
        if match:
            reason, text = match[0], text[: match[1]]
        finished = match is not None or i == len(deltas) - 1
        end = checker.emittable_length(text, finished)
        assert end >= emitted
        chunks.append(text[emitted:end])
        emitted = end
        if finished:
            break
    return text, chunks, reason


@pytest.mark.parametrize("include, expected", [(False, "Hello "), (True, "Hello STOP")])
def test_stop_string_spanning_two_deltas(include, expected):
    text, chunks, reason = _stream_with_stops(["Hello ST", "OP more", " never"], StopChecker(["STOP"], include))
    assert (text, reason, "".join(chunks)) == (expected, "STOP", expected)
    if not include:
        assert chunks[0] == "Hello "  # "ST" may start the stop string: held back, never streamed


def test_hold_back_releases_text_that_cannot_start_a_stop_string():
    checker = StopChecker(["STOP", "<end>"])
    assert checker.emittable_length("Hello ST", finished=False) == 6
    assert checker.emittable_length("Hello <en", finished=False) == 6
    assert checker.emittable_length("Hello STx", finished=False) == 9
    assert checker.emittable_length("Hello ST", finished=True) == 8
    assert StopChecker(["STOP"], include_stop_str_in_output=True).emittable_length("Hello ST", False) == 8
    text, chunks, reason = _stream_with_stops(["a S", "Tx S", "TO", "P!"], checker)
    assert (text, reason, chunks) == ("a STx ", "STOP", ["a ", "STx ", "", ""])
