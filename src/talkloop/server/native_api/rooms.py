"""`/api/rooms`: group chats of several characters and the user, owned by one end-user.

Members join and leave as events of the room's log (presence decides what each character
sees); a user message is followed by the replies of the speakers the room's strategy picks,
streamed in order (`room_turns`). Another end-user of the tenant (and any other tenant) gets
404 on every route.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field, StrictInt

from talkloop.server.deps import ServicesDep
from talkloop.server.errors import BadRequestError, ConflictError, NotFoundError
from talkloop.server.native_api import room_turns
from talkloop.server.native_api.deps import Caller, CallerDep, PageDep
from talkloop.server.native_api.message_views import MessagePublic, message_public
from talkloop.server.native_api.replies import ReplyOptions
from talkloop.server.native_api.schemas import Deleted, ListPage, Strict
from talkloop.server.store.native import NativeStore
from talkloop.server.store.native_tables import Room, RoomEventKind

router = APIRouter(prefix="/rooms", tags=["rooms"])
Strategy = Literal["round_robin", "natural", "manual", "director"]
MAX_MEMBERS = 16
SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}, "application/json": {}}}
}


class RoomCreate(Strict):
    character_ids: list[str] = Field(default_factory=list, max_length=MAX_MEMBERS)
    strategy: Strategy = "round_robin"
    persona_id: str | None = None
    title: str = Field(default="", max_length=200)
    seed: StrictInt | None = Field(default=None, ge=0, description="natural order's seed")


class MemberJoin(Strict):
    character_id: str


class RoomSend(ReplyOptions, Strict):
    content: str = Field(min_length=1, max_length=100_000)
    character_id: str | None = Field(
        default=None, description="who replies (manual rooms: nobody unless named)"
    )


class RoomNext(ReplyOptions, Strict):
    character_id: str | None = Field(default=None, description="required in manual rooms")


class MemberPublic(BaseModel):
    character_id: str
    name: str


class RoomPublic(BaseModel):
    id: str
    object: Literal["room"] = "room"
    title: str
    strategy: str
    persona_id: str | None
    conversation_id: str
    members: list[MemberPublic] = Field(description="present now, in order of first joining")
    created_at: datetime


class RoomMessagePublic(MessagePublic):
    character_id: str | None = Field(description="the character who said it (None: the user)")


def room_public(store: NativeStore, row: Room) -> RoomPublic:
    members = []
    for character_id in store.rooms.present_character_ids(row):
        character = store.characters.resolve(character_id)
        name = room_turns.DELETED_NAME if character is None else character.name
        members.append(MemberPublic(character_id=character_id, name=name))
    return RoomPublic(
        id=row.id,
        title=row.title,
        strategy=row.strategy,
        persona_id=store.personas.persona_id_of(row.conversation_id),
        conversation_id=row.conversation_id,
        members=members,
        created_at=row.created_at,
    )


def owned_room(caller: Caller, room_id: str) -> Room:
    """The caller's room (404 for another tenant's or another end-user's)."""
    return caller.store.rooms.get(room_id, caller.end_user_id)


def join(caller: Caller, row: Room, character_id: str) -> None:
    character = caller.store.catalog.get(character_id, caller.end_user_id)
    if character.id in caller.store.rooms.present_character_ids(row):
        raise ConflictError(f"character {character.id!r} is already in room {row.id!r}")
    caller.store.rooms.add_event(row, RoomEventKind.JOIN, character_id=character.id)


@router.post("", status_code=201)
def create_room(body: RoomCreate, caller: CallerDep) -> RoomPublic:
    if len(set(body.character_ids)) != len(body.character_ids):
        raise BadRequestError("character_ids lists a character twice", param="character_ids")
    if body.persona_id is not None:
        caller.store.personas.get(body.persona_id, caller.end_user_id)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    row = caller.store.rooms.create(caller.end_user_id, body.title, body.strategy, seed)
    caller.store.personas.use_in(row.conversation_id, body.persona_id)
    for character_id in body.character_ids:
        join(caller, row, character_id)
    caller.commit()
    return room_public(caller.store, row)


@router.get("")
def list_rooms(caller: CallerDep, page: PageDep) -> ListPage[RoomPublic]:
    found = caller.store.rooms.page(caller.end_user_id, page)
    return ListPage[RoomPublic].of(found, lambda row: room_public(caller.store, row))


@router.get("/{room_id}")
def get_room(room_id: str, caller: CallerDep) -> RoomPublic:
    return room_public(caller.store, owned_room(caller, room_id))


@router.delete("/{room_id}")
def delete_room(room_id: str, caller: CallerDep) -> Deleted:
    caller.store.rooms.delete(owned_room(caller, room_id))
    caller.commit()
    return Deleted(id=room_id, object="room")


@router.post("/{room_id}/members")
def add_member(room_id: str, body: MemberJoin, caller: CallerDep) -> RoomPublic:
    """A character joins: from now on it sees the room's messages (not earlier ones)."""
    row = owned_room(caller, room_id)
    join(caller, row, body.character_id)
    caller.commit()
    return room_public(caller.store, row)


@router.delete("/{room_id}/members/{character_id}")
def remove_member(room_id: str, character_id: str, caller: CallerDep) -> RoomPublic:
    """A character leaves: it does not see what is said until it joins again."""
    row = owned_room(caller, room_id)
    if character_id not in caller.store.rooms.present_character_ids(row):
        raise NotFoundError(f"character {character_id!r} is not in room {room_id!r}")
    caller.store.rooms.add_event(row, RoomEventKind.LEAVE, character_id=character_id)
    caller.commit()
    return room_public(caller.store, row)


@router.get("/{room_id}/messages")
def list_messages(room_id: str, caller: CallerDep, page: PageDep) -> ListPage[RoomMessagePublic]:
    """The room's messages, oldest first, each with the character who said it."""
    row = owned_room(caller, room_id)
    conversation = caller.store.conversations.get(row.conversation_id)
    found = caller.store.tree.page(conversation, page, active_only=False)
    speakers = caller.store.rooms.speakers(row)
    caller.commit()

    def public(message: Any) -> RoomMessagePublic:
        base = message_public(message).model_dump()
        return RoomMessagePublic(**base, character_id=speakers.get(message.id))

    return ListPage[RoomMessagePublic].of(found, public)


@router.post("/{room_id}/messages", response_model=None, responses=SSE_DOC)
async def send_message(
    room_id: str, body: RoomSend, request: Request, caller: CallerDep, services: ServicesDep
) -> Response:
    """Post the user's message (committed first), then stream each chosen speaker's reply:
    `message`, then per speaker `speaker`, `message`, `delta`s, `done`."""
    ref = room_turns.RoomRef(services, caller.principal, caller.end_user_id, room_id)
    turn = await room_turns.RoomTurn.begin(
        ref, body, request.state.request_id, body.content, body.character_id
    )
    return await room_turns.respond(turn)


@router.post("/{room_id}/next", response_model=None, responses=SSE_DOC)
async def next_speaker(
    room_id: str, body: RoomNext, request: Request, caller: CallerDep, services: ServicesDep
) -> Response:
    """Let the next character(s) speak without a user message (manual: `character_id`)."""
    ref = room_turns.RoomRef(services, caller.principal, caller.end_user_id, room_id)
    turn = await room_turns.RoomTurn.begin(
        ref, body, request.state.request_id, None, body.character_id
    )
    return await room_turns.respond(turn)
