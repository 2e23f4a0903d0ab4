"""Incremental detokenization and stop strings, ready for streaming.

Detokenization rides on `tokenizers.decoders.DecodeStream`, which buffers a token that ends inside a UTF-8
sequence until the character is complete, so no delta carries a stray U+FFFD. The stream is primed with a
few prompt tokens so the first output token decodes in context (a leading space stays, as in vLLM).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

_REPLACEMENT = "\ufffd"
# Prompt tokens that prime the stream; a few suffice for any decoder that looks at its left neighbour.
_PRIME_TOKENS = 6
# Already emitted tokens kept as left context to decode the held-back tail when the request finishes.
_TAIL_CONTEXT = 4


def backend_tokenizer(tokenizer: Any) -> Tokenizer:
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer (or the Tokenizer itself)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise ValueError(f"{type(tokenizer).__name__} has no `tokenizers` backend; a fast tokenizer is needed")
    return backend


class IncrementalDetokenizer:
    """Text of one sequence's output tokens, grown a few tokens at a time.

    Once `step(..., finished=True)` has run, `text` equals `tokenizer.decode(output_ids, skip_special_tokens)`
    (for decoders that strip a leading space at position 0, the text keeps the space the token carries after
    the prompt). Before that, a trailing incomplete UTF-8 sequence is held back.
    """

    def __init__(
        self, tokenizer: Any, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._backend = backend_tokenizer(tokenizer)
        self._skip_special = skip_special_tokens
        context = list(prompt_token_ids[-_PRIME_TOKENS:])
        # A prompt cut mid-character would glue its bytes to the first output token; decode(output_ids) does
        # not see the prompt, so prime only with tokens that end on a whole character.
        while context and self._decode(context).endswith(_REPLACEMENT):
            context.pop()
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._emitted_tail: list[int] = context[-_TAIL_CONTEXT:]  # left context for the final flush
        self._pending: list[int] = []  # fed to the stream but not yet turned into text
        self.token_ids: list[int] = []
        self.text = ""

    def step(self, new_token_ids: Sequence[int], finished: bool = False) -> str:
        """Feed new output tokens; returns the new text (possibly ""). With finished=True, also emits any
        held-back incomplete character as U+FFFD, as a full decode would."""
        delta = []
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            self._pending.append(token_id)
            chunk = self._stream.step(self._backend, token_id)
            if chunk is not None:
                delta.append(chunk)
                self._emitted_tail = (self._emitted_tail + self._pending)[-_TAIL_CONTEXT:]
                self._pending = []
        if finished and self._pending:
            delta.append(self._flush())
        new_text = "".join(delta)
        self.text += new_text
        return new_text

    def truncate(self, length: int) -> None:
        """Cut the text (a stop string matched); the request ends, so the stream state no longer matters."""
        self.text = self.text[:length]

    def _flush(self) -> str:
        base = self._decode(self._emitted_tail)
        full = self._decode(self._emitted_tail + self._pending)
        self._emitted_tail, self._pending = (self._emitted_tail + self._pending)[-_TAIL_CONTEXT:], []
        # The tail ends on a whole character, so decoding more bytes after it leaves its text unchanged.
        return full[len(base):]

    def _decode(self, token_ids: list[int]) -> str:
        return self._backend.decode(token_ids, skip_special_tokens=self._skip_special)


def check_stop_strings(
    text: str, new_char_count: int, stop: Sequence[str], include_stop_str_in_output: bool
) -> tuple[str, int] | None:
    """Find a stop string that ends within the last `new_char_count` characters of `text`.

    Only the tail that can hold a new match is searched (new chars + len(stop string) - 1). Returns
    (stop_str, truncate_to): the text is cut at truncate_to, exactly before the earliest match, or just after
    it when include_stop_str_in_output. None when nothing matched.
    """
    if new_char_count <= 0 or not stop:
        return None
    best: tuple[int, str] | None = None
    for stop_str in stop:
        start = max(0, len(text) - new_char_count - len(stop_str) + 1)
        index = text.find(stop_str, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop_str)
    if best is None:
        return None
    index, stop_str = best
    return stop_str, index + len(stop_str) if include_stop_str_in_output else index


class StopChecker:
    """Stop strings of one sequence, plus the streaming hold-back: text that could still be the start of a
    stop string is not emitted until it no longer can (or the sequence ends)."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output

    def check(self, text: str, new_char_count: int) -> tuple[str, int] | None:
        return check_stop_strings(text, new_char_count, self.stop, self.include_stop_str_in_output)

    def emittable_length(self, text: str, finished: bool) -> int:
        """How much of `text` may be streamed now: all of it once finished (or when the stop string is kept
        in the output), else all but the longest tail that is a proper prefix of a stop string."""
        if finished or self.include_stop_str_in_output or not self.stop:
            return len(text)
        held = 0
        for stop_str in self.stop:
            for size in range(min(len(stop_str) - 1, len(text)), held, -1):
                if text.endswith(stop_str[:size]):
                    held = size
                    break
        return len(text) - held
