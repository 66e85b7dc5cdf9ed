"""One metered generation: admitted before the response starts, metered however it ends.

`Generation.start` pulls the first chunk, so bad input and overload surface as HTTP errors
(400, 503) rather than inside a stream. Iterating `chunks()` tracks usage; its `finally`
records the ledger row (a cancelled stream counts as a client disconnect) and closing the
backend stream aborts the engine request, which frees its KV cache blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from talkloop.backends.base import GenerationChunk, GenerationRequest, ModelBackend, Usage
from talkloop.server.db.models import UsageStatus
from talkloop.server.ledger import Meter

T = TypeVar("T")


class ClientDisconnectedError(Exception):
    """The client went away before a non-streamed response was ready."""


class Generation:
    def __init__(
        self, stream: AsyncIterator[GenerationChunk], first: GenerationChunk | None, meter: Meter
    ) -> None:
        self._stream = stream
        self._first = first
        self._meter = meter

    @classmethod
    async def start(
        cls, backend: ModelBackend, request: GenerationRequest, meter: Meter
    ) -> Generation:
        stream = backend.generate(request)
        try:
            first = await anext(stream, None)
        except BaseException:
            meter.finish(UsageStatus.REJECTED)
            raise
        return cls(stream, first, meter)

    async def chunks(self) -> AsyncIterator[GenerationChunk]:
        status = UsageStatus.ERROR
        try:
            if self._first is not None:
                yield self._track(self._first)
                async for chunk in self._stream:
                    yield self._track(chunk)
            status = UsageStatus.OK
        except (asyncio.CancelledError, GeneratorExit):
            status = UsageStatus.CLIENT_DISCONNECTED
            raise
        finally:
            await _close(self._stream)
            self._meter.finish(status)

    @property
    def usage(self) -> Usage:
        return self._meter.usage

    async def close(self) -> None:
        """Give up on a generation that was started but will not be read."""
        await _close(self._stream)
        self._meter.finish(UsageStatus.CLIENT_DISCONNECTED)

    def _track(self, chunk: GenerationChunk) -> GenerationChunk:
        if chunk.usage is not None:
            self._meter.usage = chunk.usage
        return chunk


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
