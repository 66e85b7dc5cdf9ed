"""One metered generation: admitted before the response starts, metered however it ends.

`Generation.start` pulls the first chunk, so bad input and overload surface as HTTP errors
(400, 503) rather than inside a stream. Iterating `chunks()` tracks usage; its `finally`
records the ledger row (a cancelled stream counts as a client disconnect) and closing the
backend stream aborts the engine request, which frees its KV cache blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from talkloop.backends.base import (
    BackendOverloadedError,
    GenerationChunk,
    GenerationRequest,
    ModelBackend,
    Usage,
)
from talkloop.backends.engine_backend import EngineBackend
from talkloop.engine.errors import InvalidRequestError
from talkloop.engine.outputs import TokenLogprob
from talkloop.server.db.models import UsageStatus
from talkloop.server.ledger import Meter

T = TypeVar("T")


class ClientDisconnectedError(Exception):
    """The client went away before a non-streamed response was ready."""


def prompt_tokens_of(backend: ModelBackend, request: GenerationRequest) -> int:
    """The prompt's token count when a stream ended before its usage arrived (0 if unknown)."""
    if isinstance(backend, EngineBackend):
        return len(backend.prompt_token_ids(request))
    return 0


class Generation:
    def __init__(
        self,
        stream: AsyncIterator[GenerationChunk],
        first: GenerationChunk | None,
        meter: Meter,
        count_prompt: Callable[[], int],
    ) -> None:
        self._stream = stream
        self._first = first
        self._meter = meter
        self._count_prompt = count_prompt
        self._completion_tokens = 0
        self._final_usage: Usage | None = None
        self._finished = False
        if first is not None:
            self._track(first)  # generated already, even if never delivered

    @classmethod
    async def start(
        cls, backend: ModelBackend, request: GenerationRequest, meter: Meter
    ) -> Generation:
        stream = backend.generate(request)
        try:
            await meter.admit(request)  # rate limits and quotas: 429 before any work
            first = await anext(stream, None)
        except BaseException:
            meter.finish(UsageStatus.REJECTED)
            raise
        return cls(stream, first, meter, lambda: prompt_tokens_of(backend, request))

    async def chunks(self) -> AsyncIterator[GenerationChunk]:
        status = UsageStatus.ERROR
        try:
            if self._first is not None:
                yield self._first
                async for chunk in self._stream:
                    yield self._track(chunk)
            status = UsageStatus.OK
        except (asyncio.CancelledError, GeneratorExit):
            status = UsageStatus.CLIENT_DISCONNECTED
            raise
        finally:
            await _close(self._stream)
            self._finish(status)

    @property
    def usage(self) -> Usage:
        """The backend's usage once the stream ended (zeros before)."""
        return self._final_usage or Usage(0, 0, 0)

    async def close(self) -> None:
        """Give up on a generation that will not be read (a no-op once it was read to the end).

        NOTE: a streamed response runs this after its body, even when the client left before
        the body started, so an admitted request is always aborted and metered."""
        await _close(self._stream)
        self._finish(UsageStatus.CLIENT_DISCONNECTED)

    def _track(self, chunk: GenerationChunk) -> GenerationChunk:
        if chunk.queue_time_s is not None:
            self._meter.scheduled(chunk.queue_time_s)
        self._meter.chunk()
        self._completion_tokens += len(chunk.token_ids)
        if chunk.usage is not None:
            self._final_usage = chunk.usage
        return chunk

    def _finish(self, status: UsageStatus) -> None:
        """Meter what was used: the backend's usage, or (a broken stream) what was seen."""
        if self._finished:
            return
        self._finished = True
        usage = self._final_usage
        if usage is None:
            usage = Usage(self._count_prompt(), self._completion_tokens, 0)
        self._meter.usage = usage
        self._meter.finish(status)


@dataclass(frozen=True)
class GatheredChoice:
    """One choice of a non-streamed reply: all its text, logprobs and why it ended."""

    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str


async def gather_choices(generation: Generation, n: int) -> list[GatheredChoice]:
    """Collect a whole generation, choice by choice (for non-streamed responses)."""
    texts = [""] * n
    items: list[list[TokenLogprob]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    async for chunk in generation.chunks():
        texts[chunk.index] += chunk.text
        items[chunk.index] += chunk.logprobs or ()
        reasons[chunk.index] = chunk.finish_reason or reasons[chunk.index]
    return [GatheredChoice(texts[i], items[i], reasons[i] or "stop") for i in range(n)]


def _refusal_status(exc: BaseException) -> UsageStatus:
    if isinstance(exc, asyncio.CancelledError):
        return UsageStatus.CLIENT_DISCONNECTED
    if isinstance(exc, InvalidRequestError | BackendOverloadedError):
        return UsageStatus.REJECTED
    return UsageStatus.ERROR


async def _close(stream: AsyncIterator[GenerationChunk]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"


async def respond_unless_disconnected(
    request: Request, body: Awaitable[dict[str, Any]]
) -> Response:
    """The JSON response of `body`, or (nobody is listening) a bare 499 once it was cancelled."""
    try:
        return JSONResponse(await unless_disconnected(request, body))
    except ClientDisconnectedError:
        return Response(status_code=CLIENT_CLOSED_REQUEST)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client disconnects first (non-streamed responses)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnectedError
    return task.result()
