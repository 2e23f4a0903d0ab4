"""The OpenAI endpoints over the async engine: prompts in (text, token ids or chat messages through the model's
chat template), responses out in OpenAI's shapes, whole or as Server-Sent Events. Every client's requests are
aborted the moment it disconnects, so its KV blocks go back to the pool at once."""
from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from quantkit.engine.async_engine import (
    AsyncLLMEngine,
    EngineClosedError,
    EngineDeadError,
    OutputStream,
    QueueFullError,
    RequestAbortedError,
)
from quantkit.outputs import CompletionOutput, Logprob, RequestOutput
from quantkit.sampling_params import SamplingParams
from quantkit.server.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    invalid,
)


@dataclass
class Prompt:
    text: str | None
    token_ids: list[int]


@dataclass
class _Cursor:
    """How much of one choice a stream has sent."""
    text_len: int = 0
    num_tokens: int = 0
    started: bool = False
    done: bool = False


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine = engine
        llm = engine.engine
        self.model_name = model_name
        self.max_model_len = llm.max_model_len
        self.vocab_size = llm.model_config.vocab_size
        # The engine thread detokenizes with the engine's tokenizer; the event loop gets its own copy, because a
        # Rust tokenizer used from two threads at once can fail with "Already borrowed".
        self.tokenizer = copy.deepcopy(llm.tokenizer) if llm.tokenizer is not None else None
        self.created = int(time.time())

    # ---- models, tokenizer --------------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                           "model", "model_not_found")

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "quantkit",
            "root": self.engine.engine.config.model, "parent": None, "max_model_len": self.max_model_len}]}

    def _need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise invalid(f"{what} needs a tokenizer, and this server runs without one (--skip-tokenizer-init); "
                          "send prompts as token ids to /v1/completions")
        return self.tokenizer

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise invalid(f"{param}: token id {bad} is outside the vocabulary [0, {self.vocab_size})", param)

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool) -> Prompt:
        tokenizer = self._need_tokenizer("chat")
        if not getattr(tokenizer, "chat_template", None):
            raise invalid("the model has no chat template; use /v1/completions", "messages")
        conversation = []
        for i, m in enumerate(messages):
            entry = {"role": m.role, "content": m.text(i)}
            entry.update({k: v for k, v in (("name", m.name), ("tool_call_id", m.tool_call_id)) if v is not None})
            conversation.append(entry)
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja errors, raise_exception() in the template: the messages' fault
            raise invalid(f"the chat template refused these messages: {e}", "messages") from e
        return Prompt(text, tokenizer(text, add_special_tokens=False).input_ids)

    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise invalid("give exactly one of prompt and messages", "prompt")
        if req.messages is not None:
            ids = self.render_chat(req.messages, req.add_generation_prompt).token_ids
        else:
            ids = self._need_tokenizer("tokenize")(req.prompt, add_special_tokens=req.add_special_tokens).input_ids
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        self._check_token_ids(req.tokens, "tokens")
        return {"prompt": self._need_tokenizer("detokenize").decode(req.tokens)}

    def _token_text(self, token_id: int, logprob: Logprob | None = None) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    # ---- requests ---------------------------------------------------------------------------------------

    def _completion_prompts(self, req: CompletionRequest) -> list[Prompt]:
        prompt = req.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        prompts = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                prompts.append(Prompt(p, self._need_tokenizer("a text prompt")(p).input_ids))
            else:
                self._check_token_ids(p, "prompt")
                prompts.append(Prompt(None, list(p)))
            if not prompts[-1].token_ids:
                raise invalid(f"prompt {i} is empty", "prompt")
        return prompts

    def _check_length(self, prompts: list[Prompt], max_tokens: int | None, param: str) -> int:
        """max_tokens, defaulted to what is left of the context; 400 with both lengths when it does not fit."""
        longest = max(len(p.token_ids) for p in prompts)
        wanted = max_tokens if max_tokens is not None else 1
        if longest + wanted > self.max_model_len:
            raise invalid(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                          f"requested {longest + wanted} tokens ({longest} in the {param}, {wanted} for the "
                          f"completion). Please reduce the length of the {param} or of the completion.",
                          param if longest >= self.max_model_len else "max_tokens")
        return max_tokens if max_tokens is not None else self.max_model_len - longest

    async def _start(self, prompts: list[Prompt], params: SamplingParams, request_id: str,
                     raw: Request) -> tuple[OutputStream, asyncio.Task]:
        if params.stop_token_ids:
            self._check_token_ids(params.stop_token_ids, "stop_token_ids")
        try:
            stream = await self.engine.add([{"prompt": p.text, "prompt_token_ids": p.token_ids} for p in prompts],
                                           params, request_id)
        except QueueFullError as e:
            raise APIError(503, f"the server is at capacity: {e}; retry later", code="queue_full",
                           headers={"Retry-After": "1"}) from e
        except (EngineClosedError, EngineDeadError) as e:
            raise APIError(503, str(e), code="unavailable") from e
        except ValueError as e:
            raise invalid(str(e)) from e
        return stream, asyncio.create_task(_abort_on_disconnect(raw, stream))

    async def _collect(self, stream: OutputStream, watcher: asyncio.Task) -> list[RequestOutput] | None:
        """Runs a non-streaming call to the end; None when its client left (the requests are aborted)."""
        final: dict[str, RequestOutput] = {}
        try:
            async for outputs in stream:
                final.update((o.request_id, o) for o in outputs if o.finished)
        except RequestAbortedError:
            return None
        except EngineDeadError as e:
            raise APIError(500, str(e), code="engine_dead") from e
        finally:
            watcher.cancel()
            stream.abort()
        return [final[rid] for rid in stream.request_ids]

    async def _sse(self, stream: OutputStream, watcher: asyncio.Task,
                   chunks: Callable[[list[RequestOutput]], list[dict]], first: list[dict],
                   usage: Callable[[], dict] | None) -> AsyncIterator[str]:
        try:
            for chunk in first:
                yield _event(chunk)
            async for outputs in stream:
                for chunk in chunks(outputs):
                    yield _event(chunk)
            if usage is not None:
                yield _event(usage())
        except RequestAbortedError:
            return
        except EngineDeadError as e:
            yield _event(APIError(500, str(e), code="engine_dead").body())
        finally:
            watcher.cancel()
            stream.abort()
        yield "data: [DONE]\n\n"

    # ---- /v1/completions --------------------------------------------------------------------------------

    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        req.check()
        prompts = self._completion_prompts(req)
        max_tokens = self._check_length(prompts, 16 if req.max_tokens is None else req.max_tokens, "prompt")
        want_prompt_logprobs = req.echo and req.logprobs is not None
        params = req.sampling_params(max_tokens, req.logprobs, req.logprobs if want_prompt_logprobs else None)
        rid = f"cmpl-{uuid.uuid4().hex}"
        stream, watcher = await self._start(prompts, params, rid, raw)
        index_of = {engine_id: i for i, engine_id in enumerate(stream.request_ids)}
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        echo = [self._echo_text(p) if req.echo else "" for p in prompts]

        if not req.stream:
            finals = await self._collect(stream, watcher)
            if finals is None:
                return Response(status_code=499)
            choices = []
            for i, out in enumerate(finals):
                for c in out.outputs:
                    choice = {"index": i * req.n + c.index, "text": echo[i] + c.text,
                              "logprobs": self._completion_logprobs(out, c, req, echo[i], 0, len(c.token_ids), 0)
                              if req.logprobs is not None else None,
                              "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                    if req.return_token_ids:
                        choice.update(prompt_token_ids=out.prompt_token_ids, token_ids=c.token_ids)
                    choices.append(choice)
            return JSONResponse({**head, "choices": choices, "usage": _usage(prompts, finals)})

        cursors: dict[tuple[int, int], _Cursor] = {}
        latest: dict[int, RequestOutput] = {}
        include_usage = req.stream_options is not None and req.stream_options.include_usage

        def chunks(outputs: list[RequestOutput]) -> list[dict]:
            result = []
            for out in outputs:
                i = index_of[out.request_id]
                latest[i] = out
                for c in out.outputs:
                    cur = cursors.setdefault((i, c.index), _Cursor())
                    delta = _advance(cur, c, req.return_token_ids or (req.echo and not cur.started))
                    if delta is None:
                        continue
                    start = delta.start_token
                    choice = {"index": i * req.n + c.index, "text": (echo[i] if start == 0 else "") + delta.text,
                              "logprobs": self._completion_logprobs(out, c, req, echo[i], start, cur.num_tokens,
                                                                    delta.start_text)
                              if req.logprobs is not None else None,
                              "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                    if req.return_token_ids:
                        choice["token_ids"] = c.token_ids[start:cur.num_tokens]
                        if start == 0:
                            choice["prompt_token_ids"] = out.prompt_token_ids
                    result.append({**head, "choices": [choice]} | ({"usage": None} if include_usage else {}))
            return result

        def usage() -> dict:
            return {**head, "choices": [], "usage": _usage(prompts, [latest[i] for i in sorted(latest)])}

        return _streaming_response(self._sse(stream, watcher, chunks, [], usage if include_usage else None))

    def _echo_text(self, prompt: Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        return "" if self.tokenizer is None else self.tokenizer.decode(prompt.token_ids)

    def _completion_logprobs(self, out: RequestOutput, c: CompletionOutput, req: CompletionRequest,
                             echo_text: str, start: int, end: int, start_text: int) -> dict[str, Any]:
        """OpenAI's legacy shape (tokens, token_logprobs, top_logprobs, text_offset) for generated tokens
        [start, end), whose text begins at `start_text`; the first chunk of an echo leads with the prompt's."""
        tokens, token_logprobs, tops, offsets = [], [], [], []
        offset = 0

        def add(token_id: int, entry: dict[int, Logprob] | None) -> None:
            nonlocal offset
            lp = entry.get(token_id) if entry else None
            text = self._token_text(token_id, lp)
            tokens.append(text)
            token_logprobs.append(lp.logprob if lp else None)
            tops.append({self._token_text(t, e): e.logprob for t, e in entry.items()} if entry else None)
            offsets.append(offset)
            offset += len(text)

        if req.echo and start == 0:
            for token_id, entry in zip(out.prompt_token_ids, out.prompt_logprobs or []):
                add(token_id, entry)
        offset = len(echo_text) + start_text
        for token_id, entry in zip(c.token_ids[start:end], (c.logprobs or [])[start:end]):
            add(token_id, entry)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}

    # ---- /v1/chat/completions ---------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        req.check()
        prompt = self.render_chat(req.messages, req.add_generation_prompt)
        max_tokens = self._check_length([prompt], req.max_new_tokens, "messages")
        num_logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = req.sampling_params(max_tokens, num_logprobs)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream, watcher = await self._start([prompt], params, rid, raw)
        head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name}
        top = req.top_logprobs or 0

        if not req.stream:
            finals = await self._collect(stream, watcher)
            if finals is None:
                return Response(status_code=499)
            out = finals[0]
            choices = []
            for c in out.outputs:
                choice = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                          "logprobs": self._chat_logprobs(c, 0, len(c.token_ids), top) if req.logprobs else None,
                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if req.return_token_ids:
                    choice.update(prompt_token_ids=out.prompt_token_ids, token_ids=c.token_ids)
                choices.append(choice)
            return JSONResponse({**head, "choices": choices, "usage": _usage([prompt], finals),
                                 "system_fingerprint": None})

        head["object"] = "chat.completion.chunk"
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        extra = {"usage": None} if include_usage else {}
        cursors: dict[int, _Cursor] = {}
        latest: list[RequestOutput] = []
        first = [{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                       "finish_reason": None}], **extra} for i in range(req.n)]

        def chunks(outputs: list[RequestOutput]) -> list[dict]:
            result = []
            for out in outputs:
                latest[:] = [out]
                for c in out.outputs:
                    cur = cursors.setdefault(c.index, _Cursor(started=True))
                    delta = _advance(cur, c, req.return_token_ids)
                    if delta is None:
                        continue
                    start = delta.start_token
                    choice = {"index": c.index, "delta": {"content": delta.text} if delta.text else {},
                              "logprobs": self._chat_logprobs(c, start, cur.num_tokens, top) if req.logprobs
                              else None, "finish_reason": c.finish_reason}
                    if req.return_token_ids:
                        choice["token_ids"] = c.token_ids[start:cur.num_tokens]
                    result.append({**head, "choices": [choice], **extra})
            return result

        def usage() -> dict:
            return {**head, "choices": [], "usage": _usage([prompt], latest)}

        return _streaming_response(self._sse(stream, watcher, chunks, first, usage if include_usage else None))

    def _chat_logprobs(self, c: CompletionOutput, start: int, end: int, top: int) -> dict[str, Any]:
        content = []
        for tid, entry in zip(c.token_ids[start:end], (c.logprobs or [])[start:end]):
            lp = entry[tid]
            text = self._token_text(tid, lp)
            ranked = sorted((e.rank, t, e) for t, e in entry.items() if e.rank is not None and e.rank <= top)
            content.append({"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8")),
                            "top_logprobs": [{"token": (s := self._token_text(t, e)), "logprob": e.logprob,
                                              "bytes": list(s.encode("utf-8"))} for _, t, e in ranked]})
        return {"content": content}


@dataclass
class _Delta:
    text: str
    start_token: int  # the first token of this chunk
    start_text: int   # where `text` starts in the choice's text


def _advance(cur: _Cursor, c: CompletionOutput, send_tokens: bool) -> _Delta | None:
    """What a choice has to send since the last chunk, or None when nothing is worth a chunk yet (no new text,
    no finish, and no new token ids that the client asked to see)."""
    if cur.done:
        return None
    text = c.text[cur.text_len:]
    new_tokens = len(c.token_ids) > cur.num_tokens
    if not text and c.finish_reason is None and not (send_tokens and new_tokens):
        return None
    delta = _Delta(text, cur.num_tokens, cur.text_len)
    cur.text_len, cur.num_tokens, cur.started = len(c.text), len(c.token_ids), True
    cur.done = c.finish_reason is not None
    return delta


def _usage(prompts: list[Prompt], outputs: list[RequestOutput]) -> dict[str, int]:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _streaming_response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _abort_on_disconnect(raw: Request, stream: OutputStream) -> None:
    """Waits for the client's http.disconnect and aborts its requests at once (streaming or not)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            stream.abort()
            return
