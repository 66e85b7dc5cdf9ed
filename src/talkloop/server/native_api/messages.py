"""`/api/conversations/{id}/messages`: the message tree of a conversation.

Send (the user's message, then the character's reply streamed as SSE), reply (a reply to
the current leaf), regenerate (a new swipe), swipe (choose an alternative), edit (the
original text and the editor are kept), branch (a new child of any message) and delete
(a message and its subtree). Swipe choices and edits are recorded as feedback events.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import Field

from talkloop.backends.base import ModelBackend
from talkloop.server.db.models import Conversation, Message, MessageStatus
from talkloop.server.deps import ServicesDep
from talkloop.server.native_api import prompting
from talkloop.server.native_api.conversations import owned_conversation
from talkloop.server.native_api.deps import Caller, CallerDep, PageDep
from talkloop.server.native_api.message_views import MessagePublic, message_public
from talkloop.server.native_api.replies import ReplyOptions, ReplyPlan, respond
from talkloop.server.native_api.schemas import Deleted, ListPage, Strict
from talkloop.server.store.native_tables import FeedbackKind

router = APIRouter(prefix="/conversations/{conversation_id}", tags=["messages"])
SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}, "application/json": {}}}
}


class MessageSend(ReplyOptions, Strict):
    content: str = Field(min_length=1, max_length=100_000, examples=["Hello! Who are you?"])


class SwipeChoice(Strict):
    swipe_index: int = Field(ge=0)


class MessageEdit(Strict):
    content: str = Field(max_length=100_000)


class BranchCreate(Strict):
    parent_id: str | None = Field(description="the message to branch from (None: a new root)")
    role: Literal["user", "assistant"] = "user"
    content: str = Field(min_length=1, max_length=100_000)


class ReplyRequest(ReplyOptions, Strict):
    pass


def owned_message(
    caller: Caller, conversation_id: str, message_id: str
) -> tuple[Conversation, Message]:
    conversation = owned_conversation(caller, conversation_id)
    message = caller.store.conversations.get_message(message_id, conversation_id=conversation.id)
    return conversation, message


PlanFactory = Callable[[ModelBackend, int], ReplyPlan]


def plan_new_reply(caller: Caller, conversation_id: str, user_text: str | None) -> PlanFactory:
    def plan(backend: ModelBackend, max_tokens: int) -> ReplyPlan:
        store = caller.store
        conversation = owned_conversation(caller, conversation_id)
        store.tree.close_streaming(conversation)  # one generation per conversation
        speaker = prompting.conversation_speaker(store, conversation)
        committed = []
        if user_text is not None:
            persona = store.personas.for_conversation(conversation.id)
            user = store.conversations.add_message(
                conversation, "user", user_text, name=persona.name
            )
            committed.append(user)
        history = prompting.history_of(store.tree.path_to(conversation, None))
        prompt = prompting.assemble(store, backend, speaker, conversation, history, max_tokens)
        reply = store.conversations.add_message(
            conversation, "assistant", "", status=MessageStatus.STREAMING, name=speaker.card.name
        )
        store.tree.heartbeat(conversation)
        caller.commit()
        publics = [message_public(row) for row in (*committed, reply)]
        return ReplyPlan(conversation.id, reply.id, speaker.character_id, prompt, publics)

    return plan


@router.get("/messages")
def list_messages(
    conversation_id: str,
    caller: CallerDep,
    page: PageDep,
    branch: Literal["all", "active"] = "all",
) -> ListPage[MessagePublic]:
    """Every message of the tree, or (`branch=active`) the current branch, oldest first."""
    conversation = owned_conversation(caller, conversation_id)
    found = caller.store.tree.page(conversation, page, active_only=branch == "active")
    caller.commit()
    return ListPage[MessagePublic].of(found, message_public)


@router.get("/messages/{message_id}")
def get_message(conversation_id: str, message_id: str, caller: CallerDep) -> MessagePublic:
    conversation, message = owned_message(caller, conversation_id, message_id)
    caller.store.tree.repair_stale(conversation)
    caller.commit()
    return message_public(message)


@router.post("/messages", response_model=None, responses=SSE_DOC)
async def send_message(
    conversation_id: str,
    body: MessageSend,
    request: Request,
    caller: CallerDep,
    services: ServicesDep,
) -> Response:
    """Post the user's message (committed first) and stream the character's reply."""
    plan = plan_new_reply(caller, conversation_id, body.content)
    return await respond(request, services, caller.principal, body, plan)


@router.post("/reply", response_model=None, responses=SSE_DOC)
async def reply(
    conversation_id: str,
    body: ReplyRequest,
    request: Request,
    caller: CallerDep,
    services: ServicesDep,
) -> Response:
    """A new character reply after the current leaf (e.g. after a branch or a failed reply)."""
    plan = plan_new_reply(caller, conversation_id, None)
    return await respond(request, services, caller.principal, body, plan)


@router.post("/messages/{message_id}/regenerate", response_model=None, responses=SSE_DOC)
async def regenerate(
    conversation_id: str,
    message_id: str,
    body: ReplyRequest,
    request: Request,
    caller: CallerDep,
    services: ServicesDep,
) -> Response:
    """A new swipe of a character reply, from the same history."""

    def plan(backend: ModelBackend, max_tokens: int) -> ReplyPlan:
        store = caller.store
        conversation, message = owned_message(caller, conversation_id, message_id)
        store.tree.repair_stale(conversation)
        speaker = prompting.conversation_speaker(store, conversation)
        previous = message.swipe_index
        path = store.tree.path_to(conversation, message.parent_id)
        history = prompting.history_of(path)
        prompt = prompting.assemble(store, backend, speaker, conversation, history, max_tokens)
        store.tree.start_regeneration(message)
        store.tree.checkout(conversation, message.id)
        store.tree.heartbeat(conversation)
        caller.commit()
        public = [message_public(message)]
        return ReplyPlan(
            conversation.id, message.id, speaker.character_id, prompt, public, previous
        )

    return await respond(request, services, caller.principal, body, plan)


@router.post("/messages/{message_id}/swipe")
def choose_swipe(
    conversation_id: str, message_id: str, body: SwipeChoice, caller: CallerDep
) -> MessagePublic:
    """Show another alternative (recorded as a `swipe` feedback event)."""
    conversation, message = owned_message(caller, conversation_id, message_id)
    previous = caller.store.tree.choose_swipe(message, body.swipe_index)
    if previous != body.swipe_index:
        caller.store.feedback.record(
            conversation,
            message,
            FeedbackKind.SWIPE,
            swipe_index=body.swipe_index,
            previous_swipe_index=previous,
        )
    caller.commit()
    return message_public(message)


@router.patch("/messages/{message_id}")
def edit_message(
    conversation_id: str, message_id: str, body: MessageEdit, caller: CallerDep
) -> MessagePublic:
    """Rewrite the chosen swipe; the original and the editor are kept as an `edit` event."""
    conversation, message = owned_message(caller, conversation_id, message_id)
    original = caller.store.tree.edit(message, body.content)
    editor = caller.principal.end_user or f"key:{caller.principal.key_id}"
    caller.store.feedback.record(
        conversation,
        message,
        FeedbackKind.EDIT,
        swipe_index=message.swipe_index,
        original_text=original,
        edited_text=body.content,
        editor=editor,
    )
    caller.commit()
    return message_public(message)


@router.post("/branch", status_code=201)
def branch(conversation_id: str, body: BranchCreate, caller: CallerDep) -> MessagePublic:
    """A new child of `parent_id`, which becomes the active leaf (the old branch is kept)."""
    conversation = owned_conversation(caller, conversation_id)
    if body.parent_id is not None:
        caller.store.conversations.get_message(body.parent_id, conversation_id=conversation.id)
    caller.store.tree.checkout(conversation, body.parent_id)
    name = None
    if body.role == "user":
        name = caller.store.personas.for_conversation(conversation.id).name
    message = caller.store.conversations.add_message(
        conversation, body.role, body.content, parent_id=body.parent_id, name=name
    )
    caller.commit()
    return message_public(message)


@router.delete("/messages/{message_id}")
def delete_message(conversation_id: str, message_id: str, caller: CallerDep) -> Deleted:
    """Delete a message and every message under it."""
    conversation, message = owned_message(caller, conversation_id, message_id)
    caller.store.tree.delete(conversation, message)
    caller.commit()
    return Deleted(id=message_id, object="message")
