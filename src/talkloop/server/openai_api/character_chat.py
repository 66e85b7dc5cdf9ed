"""`model: "character/<id>"` on `/v1/chat/completions`: who may use the character, and the
conversation the server keeps when the client asks it to.

Every `character/<id>` request is checked first: an end-user's private character is not found
for another end-user of the tenant (404 `model_not_found`), as for another tenant.

Server-side history is asked for with header `X-Talkloop-Conversation`: a conversation id
continues that native conversation (the caller's, with this character); `new` opens one (with
the card's greeting, as `POST /api/conversations` does). The LAST user message of `messages`
is the new turn; the other messages are ignored, since the prompt is assembled from the stored
history (`native_api.prompting`). The user message is committed before generation, the reply
saved as it streams (`incomplete` if cut off), and the response is the normal OpenAI one
(`n` = 1) with the conversation id in the same header. `user` never selects a conversation:
clients send it beside full histories. Without the header a request stays stateless.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response

from talkloop.backends.base import GenerationChunk, GenerationRequest, Usage
from talkloop.engine.sampling_params import SamplingParams
from talkloop.server.auth import Principal
from talkloop.server.db.models import MessageStatus
from talkloop.server.errors import BadRequestError, NotFoundError
from talkloop.server.native_api.conversations import (
    ConversationCreate,
    open_conversation,
    owned_conversation,
)
from talkloop.server.native_api.deps import Caller
from talkloop.server.native_api.messages import plan_new_reply
from talkloop.server.native_api.replies import FLUSH_INTERVAL_S, ReplyPlan, ReplyWriter
from talkloop.server.openai_api.calls import Call, sse_response
from talkloop.server.openai_api.generation import Generation, respond_unless_disconnected
from talkloop.server.openai_api.schemas import ChatCompletionRequest, ChatMessage
from talkloop.server.services import Services
from talkloop.server.store.native import NativeStore

if TYPE_CHECKING:  # chat.py imports this module
    from talkloop.server.openai_api.chat import ChatStream

CONVERSATION_HEADER = "X-Talkloop-Conversation"
NEW_CONVERSATION = "new"
ENDPOINT = "chat.completions"


def end_user_row_id(store: NativeStore, principal: Principal) -> str | None:
    return None if principal.end_user is None else store.end_users.ensure(principal.end_user).id


async def check_visible(services: Services, call: Call) -> None:
    """404 `model_not_found` unless the caller's end-user may see the character."""
    character_id = call.model.character_id
    if character_id is None:
        return

    def check() -> None:
        with services.db.session() as session:
            store = NativeStore(session, call.principal.tenant_id)
            try:
                store.catalog.get(character_id, end_user_row_id(store, call.principal))
            except NotFoundError:
                raise NotFoundError(
                    f"the model {call.model.name!r} does not exist: no such character",
                    param="model",
                    code="model_not_found",
                ) from None

    await asyncio.to_thread(check)


def wants_history(request: Request, call: Call) -> bool:
    if CONVERSATION_HEADER not in request.headers:
        return False
    if call.model.character_id is None:
        raise BadRequestError(
            f"{CONVERSATION_HEADER} needs a character model (character/<id>), "
            f"got {call.model.name!r}",
            param="model",
        )
    return True


def new_turn(body: ChatCompletionRequest) -> str:
    """The last user message's text: the turn the stored conversation does not have yet."""
    users = [(i, m) for i, m in enumerate(body.messages) if m.role == "user"]
    if not users:
        raise BadRequestError(
            f"with {CONVERSATION_HEADER} the last user message is the new turn; there is none",
            param="messages",
        )
    index, message = users[-1]
    text = _text(message, index)
    if not text.strip():
        raise BadRequestError("the new user message is empty", param=f"messages[{index}]")
    return text


def _text(message: ChatMessage, index: int) -> str:
    if not isinstance(message.content, list):
        return message.content or ""
    if any(part.type != "text" for part in message.content):
        raise BadRequestError("send the new turn as text parts", param=f"messages[{index}]")
    return "".join(part.text or "" for part in message.content)


def plan_reply(
    services: Services, call: Call, conversation_ref: str, text: str, max_tokens: int
) -> ReplyPlan:
    """Open or load the conversation, commit the user message and the empty reply row."""
    character_id = call.model.character_id or ""
    with services.db.new_session() as session:
        store = NativeStore(session, call.principal.tenant_id)
        caller = Caller(call.principal, store, end_user_row_id(store, call.principal))
        if conversation_ref == NEW_CONVERSATION:
            body = ConversationCreate(character_id=character_id)
            conversation = open_conversation(caller, body)
        else:
            conversation = owned_conversation(caller, conversation_ref)
        if conversation.character_id != character_id:
            raise BadRequestError(
                f"conversation {conversation.id!r} is with character "
                f"{conversation.character_id!r}, not {character_id!r}",
                param="model",
            )
        return plan_new_reply(caller, conversation.id, text)(call.model.backend, max_tokens)


class SavedGeneration(Generation):
    """A started generation whose text is saved into the reply row as it streams.

    NOTE: it wraps the started one (metering stays there) and so skips `Generation.__init__`.
    """

    def __init__(self, inner: Generation, writer: ReplyWriter) -> None:
        self._inner = inner
        self._writer = writer
        self._saved = False

    @property
    def usage(self) -> Usage:
        return self._inner.usage

    async def chunks(self) -> AsyncIterator[GenerationChunk]:
        text, last_flush = "", time.monotonic()
        try:
            async for chunk in self._inner.chunks():
                text += chunk.text
                if time.monotonic() - last_flush >= FLUSH_INTERVAL_S:
                    await asyncio.to_thread(self._writer.save, text, MessageStatus.STREAMING)
                    last_flush = time.monotonic()
                yield chunk
        except Exception:  # the backend failed mid-stream: keep what was said
            await self._save(text, MessageStatus.INCOMPLETE)
            raise
        except BaseException:  # cancelled (client gone): save now, an await may not finish
            self._saved = True
            self._writer.save(text, MessageStatus.INCOMPLETE)
            raise
        await self._save(text, MessageStatus.COMPLETE)

    async def close(self) -> None:
        await self._inner.close()
        if not self._saved:
            await self._save("", MessageStatus.INCOMPLETE)

    async def _save(self, text: str, status: MessageStatus) -> None:
        self._saved = True
        await asyncio.to_thread(self._writer.save, text, status)


async def respond(
    request: Request,
    services: Services,
    call: Call,
    body: ChatCompletionRequest,
    params: SamplingParams,
    chat: ChatStream,
) -> Response:
    """Continue the stored conversation; the OpenAI response names it in the header."""
    if body.n != 1:
        raise BadRequestError(f"{CONVERSATION_HEADER} keeps one reply: n must be 1", param="n")
    ref, text = request.headers[CONVERSATION_HEADER], new_turn(body)
    plan = await asyncio.to_thread(plan_reply, services, call, ref, text, params.max_tokens)
    writer = ReplyWriter(services, call.principal.tenant_id, plan)
    generation_request = GenerationRequest(
        call.request_id, params, messages=plan.prompt, session_id=plan.conversation_id
    )
    try:
        meter = call.meter(services, ENDPOINT)
        started = await Generation.start(call.model.backend, generation_request, meter)
    except BaseException:
        await asyncio.to_thread(writer.abandon)
        raise
    saved = SavedGeneration(started, writer)
    if body.stream:
        response: Response = sse_response(chat.events(saved), saved)
    else:
        response = await respond_unless_disconnected(request, chat.collect(saved))
    response.headers[CONVERSATION_HEADER] = plan.conversation_id
    return response
