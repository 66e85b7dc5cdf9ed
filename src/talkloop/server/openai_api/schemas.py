"""Request bodies of the OpenAI-compatible API, as OpenAI documents them.

Unknown fields are ignored (clients send many); fields OpenAI lacks but vLLM accepts
(`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`) ride along as extras.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Lenient(BaseModel):
    """Lenient about unknown fields, strict about types: JSON's own, no coercion (`0` is not
    `false`, `"7"` is not `7`), as OpenAI refuses them too."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class TextPart(Lenient):
    type: str
    text: str | None = None


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(Lenient):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`, plus talkloop's `regex` and `choice` types."""

    model_config = ConfigDict(extra="allow", frozen=True)  # keeps `json_schema`, `regex` ...
    type: Literal["text", "json_object", "json_schema", "regex", "choice"]


class SamplingFields(Lenient):
    """What chat and legacy completions share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None  # legacy: how many top logprobs per token
    echo: bool = False
