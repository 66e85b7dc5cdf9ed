"""What every `/v1` call shares: its context (ids, caller, model), metering, SSE framing.

A `Call` is resolved once per request through `ModelRegistry`: a backend name in memory, a
character through the caller's tenant store, off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from talkloop.backends.base import Usage
from talkloop.server.auth import Principal
from talkloop.server.ledger import Meter
from talkloop.server.model_registry import ResolvedModel, is_character
from talkloop.server.openai_api.generation import Generation
from talkloop.server.services import Services
from talkloop.server.store import TenantStore

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Call:
    request_id: str
    principal: Principal
    model: ResolvedModel
    created: int  # unix seconds, as OpenAI reports it

    def meter(self, services: Services, endpoint: str) -> Meter:
        return Meter.start(
            services.ledger,
            self.principal,
            self.request_id,
            model=self.model.backend.model_name,
            endpoint=endpoint,
            character_id=self.model.character_id,
        )


async def resolve_call(
    request: Request, services: Services, principal: Principal, model: str
) -> Call:
    def resolve() -> ResolvedModel:
        with services.db.session() as session:
            return services.models.resolve(model, TenantStore(session, principal.tenant_id))

    if is_character(model):  # a database lookup, off the event loop
        resolved = await asyncio.to_thread(resolve)
    else:
        resolved = services.models.resolve_backend(model)
    return Call(request.state.request_id, principal, resolved, int(time.time()))


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
_INDEX_MARK, _TEXT_MARK = "\x00index\x00", "\x00text\x00"


class TextEvent:
    """`sse(...)` of a stream's most common chunk, one choice whose only varying parts are its
    index and a string, from a template rendered once per stream: per token, one `json.dumps`
    of the string instead of the whole chunk (the bytes are the same).

    `render(choice)` is the full chunk for a one-choice list; `choice(index, text)` that choice.
    """

    def __init__(
        self,
        render: Callable[[list[dict[str, Any]]], dict[str, Any]],
        choice: Callable[[Any, str], dict[str, Any]],
    ) -> None:
        template = sse(render([choice(_INDEX_MARK, _TEXT_MARK)]))
        self._head, rest = template.split(_dumps(_INDEX_MARK))
        self._middle, self._tail = rest.split(_dumps(_TEXT_MARK))

    def __call__(self, index: int, text: str) -> str:
        return f"{self._head}{index:d}{self._middle}{_dumps(text)}{self._tail}"


def _dumps(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def sse_response(events: AsyncIterator[str], generation: Generation) -> StreamingResponse:
    """An SSE response whose generation is closed after the body, however the body ended."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers=SSE_HEADERS,
        background=BackgroundTask(generation.close),
    )
