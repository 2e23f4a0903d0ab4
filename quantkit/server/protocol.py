"""Request bodies of the OpenAI API (field names, defaults and ranges as OpenAI documents them) plus vLLM's
sampling extras, and the OpenAI error shape. Unknown fields are refused with a 400 naming them, as OpenAI does,
so a typo never silently changes nothing; NaN and infinities are refused everywhere."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from quantkit.sampling_params import SamplingParams

# Top logprobs per position that a request may ask for (vLLM's default max_logprobs).
MAX_LOGPROBS = 20
_INT64 = 2**63


class APIError(Exception):
    """Becomes {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param, code="invalid_value" if param else None)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingRequest(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    return_token_ids: bool = False  # adds prompt_token_ids / token_ids to the choices (and every stream chunk)

    @field_validator("n", "temperature", "top_p", "stream", "presence_penalty", "frequency_penalty", "top_k",
                     "min_p", "repetition_penalty", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """Some clients send null for "not set"; OpenAI reads it as the default."""
        return cls.model_fields[info.field_name].default if value is None else value

    def check_common(self) -> None:
        """Checks that span fields or name features quantkit does not have; each names its parameter."""
        if self.logit_bias:
            raise invalid("logit_bias is not supported by quantkit's sampler; leave it out", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true", "stream_options")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        try:
            return SamplingParams(
                n=self.n, temperature=self.temperature, top_p=self.top_p,
                top_k=-1 if self.top_k == 0 else self.top_k, min_p=self.min_p,
                repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, seed=self.seed, max_tokens=max_tokens,
                min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
                include_stop_str_in_output=self.include_stop_str_in_output, ignore_eos=self.ignore_eos,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between_special_tokens)
        except ValueError as e:  # "SamplingParams.<field> must ..."
            message = str(e)
            param = message.split(" ", 1)[0].removeprefix("SamplingParams.")
            raise invalid(message.removeprefix("SamplingParams."), param) from e


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # null means the default, 16, as in OpenAI's API
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise invalid("suffix (fill-in-the-middle) is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise invalid(f"best_of={self.best_of} != n={self.n} is not supported (no beam/best-of search); "
                          "leave best_of out", "best_of")
        if isinstance(self.prompt, list) and not self.prompt:
            raise invalid("prompt must not be an empty list", "prompt")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self, index: int) -> str:
        """The content as one string; only text parts exist for a text-only model."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise invalid(f"messages[{index}].content: only {{'type': 'text', 'text': ...}} parts are "
                              f"supported, got {str(part)[:80]}", f"messages[{index}].content")
            texts.append(part["text"])
        return "\n".join(texts)


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True  # vLLM extra

    def check(self) -> None:
        self.check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs needs logprobs=true", "top_logprobs")
        if self.response_format is not None and self.response_format.type != "text":
            raise invalid(f"response_format {self.response_format.type!r} needs guided decoding, which quantkit "
                          "does not have; only {'type': 'text'} is supported", "response_format")
        if self.tools or (self.tool_choice not in (None, "none")):
            raise invalid("tool calling is not supported", "tools")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
