"""Generating a reply into a message row, streamed as SSE or returned whole.

Reliability: the row (and the user's message before it) is committed before generation
starts, with status `streaming`. The text is flushed every `FLUSH_INTERVAL_S` (bumping the
conversation's heartbeat); the reply ends `complete`, or `incomplete` with the partial text
if the backend fails or the client disconnects. If the server dies mid-stream, the
`streaming` row goes stale and reads back `incomplete` (see `store.message_tree`).
SSE events: `message` (each committed message), `delta` (text), `error`, then `done`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from talkloop.backends.base import GenerationRequest, ModelBackend
from talkloop.engine.sampling_params import SamplingParams
from talkloop.server.auth import Principal
from talkloop.server.db.models import MessageStatus
from talkloop.server.errors import as_server_error
from talkloop.server.ledger import Meter
from talkloop.server.native_api.message_views import MessagePublic, message_public
from talkloop.server.openai_api.calls import SSE_HEADERS, usage_body
from talkloop.server.openai_api.generation import Generation
from talkloop.server.services import Services
from talkloop.server.store.native import NativeStore

FLUSH_INTERVAL_S = 0.5
ENDPOINT = "native.messages"


class ReplyOptions(BaseModel):
    """Sampling of the reply; `stream: false` returns the finished messages as JSON."""

    max_tokens: int | None = Field(default=None, ge=1, le=8192)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    ignore_eos: bool = Field(default=False, description="generate exactly max_tokens")
    stream: bool = True

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        params = SamplingParams(
            max_tokens=self.max_tokens or default_max_tokens, ignore_eos=self.ignore_eos
        )
        given: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p}
        given["seed"] = self.seed
        return dataclasses.replace(params, **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class ReplyPlan:
    """A reply row committed as `streaming`, and the prompt that will fill it."""

    conversation_id: str
    message_id: str
    character_id: str | None
    prompt: list[dict[str, str]]
    committed: list[MessagePublic]  # announced first: the user's message, the reply row
    previous_swipe_index: int | None = None  # a regeneration: the swipe shown before


class ReplyWriter:
    """Saves the reply row's text and status, each time in a short transaction."""

    def __init__(self, services: Services, tenant_id: str, plan: ReplyPlan) -> None:
        self._db = services.db
        self._tenant_id = tenant_id
        self._plan = plan

    def save(self, text: str, status: MessageStatus) -> MessagePublic:
        with self._db.session() as session:
            store = NativeStore(session, self._tenant_id)
            conversation = store.conversations.get(self._plan.conversation_id)
            message = store.conversations.get_message(self._plan.message_id)
            store.conversations.set_message_text(message, text, status)
            store.tree.heartbeat(conversation)
            return message_public(message)

    def abandon(self) -> None:
        """Generation never started: take the empty reply (or swipe) back out."""
        with self._db.session() as session:
            store = NativeStore(session, self._tenant_id)
            conversation = store.conversations.get(self._plan.conversation_id)
            message = store.conversations.get_message(self._plan.message_id)
            store.tree.abandon_reply(conversation, message, self._plan.previous_swipe_index)


def sse_event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False, default=str)}\n\n"


Event = tuple[str, dict[str, Any]]


async def reply_events(
    plan: ReplyPlan, generation: Generation, writer: ReplyWriter
) -> AsyncIterator[Event]:
    for message in plan.committed:
        yield "message", message.model_dump(mode="json")
    text, finish, error = "", None, None
    status = MessageStatus.INCOMPLETE
    last_flush = time.monotonic()
    try:
        async for chunk in generation.chunks():
            text += chunk.text
            finish = chunk.finish_reason or finish
            if chunk.text:
                yield "delta", {"message_id": plan.message_id, "content": chunk.text}
            if time.monotonic() - last_flush >= FLUSH_INTERVAL_S:
                await asyncio.to_thread(writer.save, text, MessageStatus.STREAMING)
                last_flush = time.monotonic()
        status = MessageStatus.COMPLETE
    except Exception as exc:  # the backend failed mid-stream: keep what was said
        error = as_server_error(exc)
    except BaseException:  # cancelled (client gone): save now, an await may not finish
        writer.save(text, MessageStatus.INCOMPLETE)
        raise
    final = await asyncio.to_thread(writer.save, text, status)
    if error is not None:
        yield "error", error.body()
    usage = usage_body(generation.usage)
    yield (
        "done",
        {"message": final.model_dump(mode="json"), "finish_reason": finish, "usage": usage},
    )


def meter(services: Services, principal: Principal, request_id: str, plan: ReplyPlan) -> Meter:
    return Meter.start(
        services.ledger,
        principal,
        request_id,
        model=services.models.default.model_name,
        endpoint=ENDPOINT,
        character_id=plan.character_id,
    )


async def respond(
    request: Request,
    services: Services,
    principal: Principal,
    options: ReplyOptions,
    plan_reply: Callable[[ModelBackend, int], ReplyPlan],
) -> Response:
    """Commit the messages (`plan_reply`, off the loop), start generating, then stream."""
    backend = services.models.default
    max_tokens = options.max_tokens or services.settings.default_max_tokens
    plan = await asyncio.to_thread(plan_reply, backend, max_tokens)
    writer = ReplyWriter(services, principal.tenant_id, plan)
    params = options.sampling(services.settings.default_max_tokens)
    request_id = request.state.request_id
    generation_request = GenerationRequest(
        request_id, params, messages=plan.prompt, session_id=plan.conversation_id
    )
    try:
        generation = await Generation.start(
            backend, generation_request, meter(services, principal, request_id, plan)
        )
    except BaseException:
        await asyncio.to_thread(writer.abandon)
        raise
    events = reply_events(plan, generation, writer)
    if options.stream:
        sse = (sse_event(name, data) async for name, data in events)
        return StreamingResponse(sse, media_type="text/event-stream", headers=SSE_HEADERS)
    return JSONResponse(await collect(events))


async def collect(events: AsyncIterator[Event]) -> dict[str, Any]:
    """A non-streamed reply: the committed messages, the final reply, and any error."""
    body: dict[str, Any] = {"messages": [], "error": None}
    async for name, data in events:
        if name == "message":
            body["messages"].append(data)
        elif name == "error":
            body["error"] = data["error"]
        elif name == "done":
            body |= data
    return body
