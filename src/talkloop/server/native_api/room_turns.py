"""A turn of a group room: replay its event log into `characters.rooms.Room`, choose who speaks
by the room's strategy, and stream each speaker's reply in order (SSE) or return them whole.

Each speaker's prompt holds only the messages it was present for (joins and leaves are log
events) and only its own lore (its card's book, its attached world books), assembled by
`prompting.assemble`. Rows are written as conversation replies are (`replies.ReplyWriter`):
committed `streaming` before generation, saved as they stream, ended `complete` or
`incomplete`. Routes and schemas live in `rooms.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from talkloop.backends.base import GenerationRequest, ModelBackend
from talkloop.characters.prompt import HistoryMessage
from talkloop.characters.rooms import (
    Chooser,
    Director,
    ManualOrder,
    NaturalOrder,
    Room,
    RoomError,
    RoomMember,
    RoundRobin,
    SpeakerStrategy,
)
from talkloop.engine.sampling_params import SamplingParams
from talkloop.server.auth import Principal
from talkloop.server.db.models import MessageStatus
from talkloop.server.errors import BadRequestError, as_server_error
from talkloop.server.ledger import Meter
from talkloop.server.native_api import prompting
from talkloop.server.native_api.message_views import MessagePublic, message_public
from talkloop.server.native_api.replies import (
    Event,
    ReplyOptions,
    ReplyPlan,
    ReplyWriter,
    reply_events,
    sse_event,
)
from talkloop.server.openai_api.calls import SSE_HEADERS
from talkloop.server.openai_api.generation import Generation
from talkloop.server.services import Services
from talkloop.server.store.native import NativeStore
from talkloop.server.store.native_tables import Room as RoomRow
from talkloop.server.store.native_tables import RoomEvent, RoomEventKind

T = TypeVar("T")
ENDPOINT = "native.rooms"
DIRECTOR_ENDPOINT = "native.rooms.director"
DIRECTOR_MAX_TOKENS = 8
DELETED_NAME = "(deleted character)"
STRATEGIES = ("round_robin", "natural", "manual", "director")


def strategy_for(name: str, seed: int, choose: Chooser) -> SpeakerStrategy:
    """The room's strategy; `seed` varies per turn so natural order does not repeat itself."""
    factories: dict[str, Callable[[], SpeakerStrategy]] = {
        "round_robin": RoundRobin,
        "natural": lambda: NaturalOrder(seed),
        "manual": ManualOrder,  # nobody speaks unless the request names who
        "director": lambda: Director(choose, fallback=RoundRobin()),
    }
    return factories[name]()


# ---------------------------------------------------------------- replaying the log


def replay(store: NativeStore, row: RoomRow) -> Room:
    """The room as its log says: members, presence, and every message (runtime ids are the
    stored message ids). A member whose character was deleted is made to leave at the end."""
    events = store.rooms.events(row)
    messages = {m.id: m for m in store.conversations.messages(row.conversation_id)}
    said = [e.message_id for e in events if e.kind == RoomEventKind.MESSAGE]
    ids = iter([row.conversation_id, *(m for m in said if m is not None and m in messages)])
    persona = store.personas.for_conversation(row.conversation_id)
    room = Room(persona=persona, id_factory=lambda: next(ids))
    deleted: set[str] = set()
    for event in events:
        _apply(store, room, event, messages, deleted)
    for member in room.present_members():
        if member.character_id in deleted:
            room.leave(member.character_id)
    return room


def _apply(
    store: NativeStore, room: Room, event: RoomEvent, messages: dict[str, Any], deleted: set[str]
) -> None:
    if event.kind == RoomEventKind.MESSAGE:
        message = messages.get(event.message_id or "")
        if message is None:
            return
        if event.character_id is None:
            room.post_user(message.content)
        else:
            room.post(event.character_id, message.content)
    elif event.character_id is not None and event.kind == RoomEventKind.JOIN:
        room.join(_member(store, room, event.character_id, deleted))
    elif event.character_id is not None:
        room.leave(event.character_id)


def _member(store: NativeStore, room: Room, character_id: str, deleted: set[str]) -> RoomMember:
    known = {member.character_id: member for member in room.members}
    if character_id in known:
        return known[character_id]
    character = store.characters.resolve(character_id)
    if character is None:
        deleted.add(character_id)
        return RoomMember(character_id, DELETED_NAME)
    return RoomMember.from_character(character_id, store.characters.card(character))


def history_for(room: Room, character_id: str) -> list[HistoryMessage]:
    """What `character_id` saw, as its prompt's history: its own lines as the assistant's,
    the user's as the user's, other characters' as user turns prefixed with their name."""
    history = []
    for message in room.visible_history(character_id):
        if not message.content:
            continue
        if message.character_id == character_id:
            history.append(HistoryMessage("assistant", message.content, message.author_name))
        elif message.character_id is None:
            history.append(HistoryMessage("user", message.content, message.author_name))
        else:
            text = f"{message.author_name}: {message.content}"
            history.append(HistoryMessage("user", text, message.author_name))
    return history


# ---------------------------------------------------------------- the steps (in a session)


@dataclass(frozen=True)
class RoomRef:
    """One caller's room; each step opens its own short session (a stream outlives the
    request's session) and reloads the room through the caller's scope."""

    services: Services
    principal: Principal
    end_user_id: str | None
    room_id: str

    async def run(self, step: Callable[[NativeStore, RoomRow], T]) -> T:
        def in_session() -> T:
            with self.services.db.session() as session:
                store = NativeStore(session, self.principal.tenant_id)
                return step(store, store.rooms.get(self.room_id, self.end_user_id))

        return await asyncio.to_thread(in_session)


def post_user(store: NativeStore, row: RoomRow, text: str | None) -> list[MessagePublic]:
    conversation = store.conversations.get(row.conversation_id)
    store.tree.close_streaming(conversation)  # one turn at a time per room
    if text is None:
        return []
    persona = store.personas.for_conversation(conversation.id)
    message = store.conversations.add_message(conversation, "user", text, name=persona.name)
    store.rooms.add_event(row, RoomEventKind.MESSAGE, message_id=message.id)
    store.tree.heartbeat(conversation)
    return [message_public(message)]


def choose_speakers(
    store: NativeStore, row: RoomRow, pick: str | None, choose: Chooser
) -> list[str]:
    """Who speaks now: the character the request names, else the room's strategy's choice."""
    room = replay(store, row)
    present = [member.character_id for member in room.present_members()]
    if pick is not None:
        if pick not in present:
            raise BadRequestError(
                f"character {pick!r} is not in room {row.id!r}; present: {present}",
                param="character_id",
            )
        return [pick]
    seed = row.seed + len(room.conversation.events) + len(room.presence_events)
    return room.next_speakers(strategy_for(row.strategy, seed, choose))


@dataclass(frozen=True)
class SpeakerTurn:
    character_id: str
    name: str
    plan: ReplyPlan


def plan_speaker(
    store: NativeStore, row: RoomRow, character_id: str, backend: ModelBackend, max_tokens: int
) -> SpeakerTurn:
    """Assemble the speaker's prompt from what it saw, then commit its empty reply row."""
    conversation = store.conversations.get(row.conversation_id)
    room = replay(store, row)
    try:
        history = history_for(room, character_id)
    except RoomError as exc:
        raise BadRequestError(str(exc), param="character_id") from None
    character = store.catalog.get(character_id, None)
    speaker = prompting.Speaker(store.characters.card(character), character.id)
    prompt = prompting.assemble(store, backend, speaker, conversation, history, max_tokens)
    reply = store.conversations.add_message(
        conversation, "assistant", "", status=MessageStatus.STREAMING, name=speaker.card.name
    )
    store.rooms.add_event(
        row, RoomEventKind.MESSAGE, character_id=character_id, message_id=reply.id
    )
    store.tree.heartbeat(conversation)
    plan = ReplyPlan(conversation.id, reply.id, character_id, prompt, [message_public(reply)])
    return SpeakerTurn(character_id, speaker.card.name, plan)


def room_meter(
    services: Services,
    principal: Principal,
    request_id: str,
    character_id: str | None,
    endpoint: str,
) -> Meter:
    return Meter.start(
        services.ledger,
        principal,
        request_id,
        model=services.models.default.model_name,
        endpoint=endpoint,
        character_id=character_id,
    )


# ---------------------------------------------------------------- the director's model call


def matching_candidate(answer: str, candidates: list[str]) -> str:
    """The candidate the answer names (its first line, any case, trailing punctuation
    ignored), else the answer as given, for `Director` to refuse and fall back."""
    first = (answer.strip().splitlines() or [""])[0].strip().rstrip(".!,:;").strip()
    by_lower = {candidate.lower(): candidate for candidate in candidates}
    return by_lower.get(first.lower(), answer)


class DirectorModel:
    """`Director`'s chooser: called from the worker thread that replays the room, it runs the
    generation on the event loop and waits. NOTE: constrained decoding is not on the backend
    path yet, so the answer is validated (and `Director` falls back) instead of constrained."""

    def __init__(self, ref: RoomRef, request_id: str) -> None:
        self._ref = ref
        self._request_id = f"{request_id}-director"
        self._loop = asyncio.get_running_loop()

    def choose(self, prompt: str, candidates: list[str]) -> str:
        answer = asyncio.run_coroutine_threadsafe(self._ask(prompt), self._loop).result()
        return matching_candidate(answer, candidates)

    async def _ask(self, prompt: str) -> str:
        services = self._ref.services
        params = SamplingParams(max_tokens=DIRECTOR_MAX_TOKENS, temperature=0.0)
        messages = [{"role": "user", "content": prompt}]
        request = GenerationRequest(self._request_id, params, messages=messages)
        meter = room_meter(services, self._ref.principal, self._request_id, None, DIRECTOR_ENDPOINT)
        generation = await Generation.start(services.models.default, request, meter)
        return "".join([chunk.text async for chunk in generation.chunks()])


# ---------------------------------------------------------------- one turn, streamed


Started = tuple[SpeakerTurn, Generation, ReplyWriter]


class RoomTurn:
    """The user's message (if any) committed, the speakers chosen, the first one started (so
    429/503 are HTTP errors); later speakers are planned and started as the stream reaches
    them, each after the previous reply is saved."""

    def __init__(self, ref: RoomRef, options: ReplyOptions, request_id: str) -> None:
        self.ref = ref
        self.options = options
        self.request_id = request_id
        self.committed: list[MessagePublic] = []
        self.speaker_ids: list[str] = []
        self.first: Started | None = None
        self._first_taken = False

    @classmethod
    async def begin(
        cls,
        ref: RoomRef,
        options: ReplyOptions,
        request_id: str,
        text: str | None,
        pick: str | None,
    ) -> RoomTurn:
        turn = cls(ref, options, request_id)
        turn.committed = await ref.run(lambda store, row: post_user(store, row, text))
        choose = DirectorModel(ref, request_id).choose
        turn.speaker_ids = await ref.run(
            lambda store, row: choose_speakers(store, row, pick, choose)
        )
        if text is None and not turn.speaker_ids:
            raise BadRequestError(
                "nobody speaks next: name a present character in character_id "
                "(a manual room needs one; an empty room has none)",
                param="character_id",
            )
        if turn.speaker_ids:
            turn.first = await turn._start(0)
        return turn

    async def _start(self, index: int) -> Started:
        services, character_id = self.ref.services, self.speaker_ids[index]
        backend = services.models.default
        max_tokens = self.options.max_tokens or services.settings.default_max_tokens
        speaker = await self.ref.run(
            lambda store, row: plan_speaker(store, row, character_id, backend, max_tokens)
        )
        writer = ReplyWriter(services, self.ref.principal.tenant_id, speaker.plan)
        request_id = f"{self.request_id}-{index}"
        params = self.options.sampling(services.settings.default_max_tokens)
        session_id = f"{speaker.plan.conversation_id}:{character_id}"
        request = GenerationRequest(
            request_id, params, messages=speaker.plan.prompt, session_id=session_id
        )
        meter = room_meter(services, self.ref.principal, request_id, character_id, ENDPOINT)
        try:
            generation = await Generation.start(backend, request, meter)
        except BaseException:
            await asyncio.to_thread(writer.abandon)
            raise
        return speaker, generation, writer

    async def close(self) -> None:
        """After the response: a first reply never streamed (the client left before the body
        started) is aborted, metered and saved `incomplete`."""
        if self.first is not None and not self._first_taken:
            _, generation, writer = self.first
            await generation.close()
            await asyncio.to_thread(writer.save, "", MessageStatus.INCOMPLETE)

    async def events(self) -> AsyncIterator[Event]:
        """`message` (the user's), then per speaker: `speaker`, `message` (its reply row),
        `delta`s, `done`. A failure is an `error` event and ends the turn."""
        for message in self.committed:
            yield "message", message.model_dump(mode="json")
        for index in range(len(self.speaker_ids)):
            try:
                self._first_taken = True
                started = self.first if index == 0 and self.first else await self._start(index)
            except Exception as exc:
                yield "error", as_server_error(exc).body()
                return
            speaker, generation, writer = started
            info = {"character_id": speaker.character_id, "name": speaker.name}
            yield "speaker", info | {"message_id": speaker.plan.message_id}
            failed = False
            async for name, data in reply_events(speaker.plan, generation, writer):
                failed = failed or name == "error"
                yield name, data
            if failed:
                return


async def collect(events: AsyncIterator[Event]) -> dict[str, Any]:
    """A non-streamed turn: the user's message, each speaker's final reply, any error."""
    body: dict[str, Any] = {"object": "room.turn", "messages": [], "replies": [], "error": None}
    speaker: dict[str, Any] | None = None
    async for name, data in events:
        if name == "message" and speaker is None:
            body["messages"].append(data)
        elif name == "speaker":
            speaker = data
        elif name == "done":
            body["replies"].append({"speaker": speaker, **data})
        elif name == "error":
            body["error"] = data["error"]
    return body


async def respond(turn: RoomTurn) -> Response:
    events = turn.events()
    if turn.options.stream:
        sse = (sse_event(name, data) async for name, data in events)
        return StreamingResponse(
            sse,
            media_type="text/event-stream",
            headers=SSE_HEADERS,
            background=BackgroundTask(turn.close),
        )
    try:
        return JSONResponse(await collect(events))
    finally:
        await turn.close()
