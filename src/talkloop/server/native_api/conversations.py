"""`/api/conversations`: one end-user's chats with one character.

A new conversation opens with the character's greeting; its alternate greetings are swipes
of that first message. Another end-user of the tenant (and any other tenant) gets 404.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from talkloop.characters.conversation import greetings_for
from talkloop.server.db.models import Conversation
from talkloop.server.native_api.deps import Caller, CallerDep, PageDep
from talkloop.server.native_api.schemas import Deleted, ListPage, Strict
from talkloop.server.store.native import NativeStore

router = APIRouter(prefix="/conversations", tags=["conversations"])


class ConversationCreate(Strict):
    character_id: str = Field(examples=["chr_3f9a1c0d2e4b5a6c7d8e"])
    persona_id: str | None = None
    title: str = Field(default="", max_length=200)


class ConversationUpdate(Strict):
    title: str | None = Field(default=None, max_length=200)
    persona_id: str | None = Field(default=None, description="switch persona")
    active_leaf_id: str | None = Field(default=None, description="switch to another branch")


class ConversationPublic(BaseModel):
    id: str
    object: Literal["conversation"] = "conversation"
    character_id: str | None
    persona_id: str | None
    title: str
    active_leaf_id: str | None = Field(description="the message the current branch ends at")
    created_at: datetime
    updated_at: datetime


def conversation_public(store: NativeStore, row: Conversation) -> ConversationPublic:
    return ConversationPublic(
        id=row.id,
        character_id=row.character_id,
        persona_id=store.personas.persona_id_of(row.id),
        title=row.title,
        active_leaf_id=row.active_leaf_id,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def owned_conversation(caller: Caller, conversation_id: str) -> Conversation:
    """The caller's conversation (404 for another tenant's or another end-user's)."""
    return caller.store.conversations.get(conversation_id, end_user_id=caller.end_user_id)


def open_conversation(caller: Caller, body: ConversationCreate) -> Conversation:
    store = caller.store
    character = store.catalog.get(body.character_id, caller.end_user_id)
    if body.persona_id is not None:
        store.personas.get(body.persona_id, caller.end_user_id)
    card = store.characters.card(character)
    title = body.title or card.name
    row = store.conversations.create(
        end_user_id=caller.end_user_id, character_id=character.id, title=title
    )
    store.personas.use_in(row.id, body.persona_id)
    greetings = greetings_for(card, group=False)
    if greetings:
        first = store.conversations.add_message(row, "assistant", greetings[0], name=card.name)
        first.swipes = greetings
    return row


@router.post("", status_code=201)
def create_conversation(body: ConversationCreate, caller: CallerDep) -> ConversationPublic:
    row = open_conversation(caller, body)
    caller.commit()
    return conversation_public(caller.store, row)


@router.get("")
def list_conversations(
    caller: CallerDep, page: PageDep, character_id: str | None = None
) -> ListPage[ConversationPublic]:
    found = caller.store.tree.page_conversations(
        caller.end_user_id, page, character_id=character_id
    )
    return ListPage[ConversationPublic].of(
        found, lambda row: conversation_public(caller.store, row)
    )


@router.get("/{conversation_id}")
def get_conversation(conversation_id: str, caller: CallerDep) -> ConversationPublic:
    return conversation_public(caller.store, owned_conversation(caller, conversation_id))


@router.patch("/{conversation_id}")
def update_conversation(
    conversation_id: str, body: ConversationUpdate, caller: CallerDep
) -> ConversationPublic:
    row = owned_conversation(caller, conversation_id)
    if body.title is not None:
        row.title = body.title
    if "persona_id" in body.model_fields_set:
        if body.persona_id is not None:
            caller.store.personas.get(body.persona_id, caller.end_user_id)
        caller.store.personas.use_in(row.id, body.persona_id)
    if "active_leaf_id" in body.model_fields_set:
        caller.store.tree.checkout(row, body.active_leaf_id)
    caller.commit()
    return conversation_public(caller.store, row)


@router.delete("/{conversation_id}")
def delete_conversation(conversation_id: str, caller: CallerDep) -> Deleted:
    row = owned_conversation(caller, conversation_id)
    caller.store.session.delete(row)
    caller.commit()
    return Deleted(id=conversation_id, object="conversation")
