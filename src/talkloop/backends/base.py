"""The `ModelBackend` interface and the plain data that crosses it.

A backend turns a chat (messages) or a completion (prompt) into a stream of chunks, one
per sampled step, ending with usage. It does not know about tenants, keys or HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from talkloop.engine.outputs import TokenLogprob
from talkloop.engine.sampling_params import SamplingParams


class BackendError(Exception):
    """A backend could not serve a request (not the caller's fault)."""


class BackendOverloadedError(BackendError):
    """Admission refused: too many queued requests or tokens. Retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    params: SamplingParams
    messages: Sequence[Mapping[str, Any]] | None = None  # chat: rendered with the template
    prompt: str | Sequence[int] | None = None  # completion: text or token ids
    session_id: str | None = None  # affinity key: a conversation returns to one replica
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a generation request needs exactly one of messages or prompt")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class GenerationChunk:
    """What choice `index` produced since the previous chunk."""

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None  # set on the request's last chunk
    queue_time_s: float | None = None  # on the first chunk, where the backend knows it


class ModelBackend(Protocol):
    """Something that generates text for a named model."""

    @property
    def model_name(self) -> str: ...

    @property
    def context_window(self) -> int: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream chunks; raises InvalidRequestError before the first one for bad input."""
        ...

    def count_tokens(self, text: str) -> int: ...

    async def is_ready(self) -> bool: ...

    def stats(self) -> Mapping[str, float]:
        """Gauges for /metrics (running, waiting, KV usage, prefix hit rate ...)."""
        ...

    async def close(self) -> None: ...
