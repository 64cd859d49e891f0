"""The OpenAI request bodies the server accepts, and OpenAI-shaped errors (chapter 10).

Pydantic checks the *types* of a body (a string where a number belongs is a 422, as in vLLM); the *ranges*
(temperature >= 0, top_p in (0, 1], ...) are SamplingParams' to check, and come back as 400s with its message.
Fields the OpenAI API defines but minillm cannot honour (echo, penalties) are refused with a 400
that says so, rather than silently ignored: a client that asked for them must not get a silent default.
Log-probabilities map onto SamplingParams.logprobs through `num_logprobs()`: completions' `logprobs` (an int, the
top-k), chat's `logprobs` (a bool) with `top_logprobs` (an int).
Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # choices per request: each is a full request in the engine


class ApiError(Exception):
    """An error the client caused (or may retry), turned into {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error shape: what the openai client parses into APIStatusError.message."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """What completions and chat share: the sampling knobs and the streaming switch."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the one model this server serves
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # vLLM's extension
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: benchmarks use it to fix the output length
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    def unsupported(self) -> str | None:
        """The first requested feature minillm does not implement, as a message; None if all is supported."""
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty are not supported yet (give 0)"
        if self.stream_options is not None and not self.stream:
            return "stream_options is only allowed with stream=true"
        if not 1 <= self.n <= MAX_N:
            return f"n must be an integer in [1, {MAX_N}], got {self.n}"
        return None

    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs for this request: None when log-probabilities were not asked for."""
        return None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo is not supported yet"
        if self.suffix:
            return "suffix is not supported"
        return super().unsupported()


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> str | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs is only allowed with logprobs=true"
        return super().unsupported()
