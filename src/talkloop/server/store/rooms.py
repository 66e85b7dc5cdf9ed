"""Group rooms of one tenant: the room row, its conversation, and its ordered event log
(joins, leaves, and who said each message). Owned by the end-user who created the room.

Turn-taking is not decided here: the API replays the log into `characters.rooms.Room`.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Select, func, select

from talkloop.server.errors import NotFoundError
from talkloop.server.store.conversations import ConversationRepo
from talkloop.server.store.native_tables import Room, RoomEvent, RoomEventKind
from talkloop.server.store.pagination import Page, PageRequest, paginate
from talkloop.server.store.scoped import Scoped


class RoomRepo(Scoped):
    def __init__(self, conversations: ConversationRepo) -> None:
        super().__init__(conversations.session, conversations.tenant_id)
        self.conversations = conversations

    def _owned(self, end_user_id: str | None) -> Select[Room]:
        query = self._select(Room)
        if end_user_id is not None:
            query = query.where(Room.end_user_id == end_user_id)
        return query

    def create(self, end_user_id: str | None, title: str, strategy: str, seed: int) -> Room:
        conversation = self.conversations.create(end_user_id=end_user_id, title=title)
        row = Room(
            end_user_id=end_user_id,
            conversation_id=conversation.id,
            title=title,
            strategy=strategy,
            seed=seed,
        )
        return self._add(row)

    def get(self, room_id: str, end_user_id: str | None) -> Room:
        row = self.session.scalars(self._owned(end_user_id).where(Room.id == room_id)).first()
        if row is None:
            raise NotFoundError(f"no room with id {room_id!r}")
        return row

    def page(self, end_user_id: str | None, page: PageRequest) -> Page[Room]:
        return paginate(self.session, self._owned(end_user_id), Room, page)

    def delete(self, room: Room) -> None:
        conversation = self.conversations.get(room.conversation_id)
        self.session.delete(room)
        self.session.flush()  # NOTE: first, or the conversation's cascade takes the room
        self.session.delete(conversation)
        self.session.flush()

    def add_event(
        self,
        room: Room,
        kind: RoomEventKind,
        *,
        character_id: str | None = None,
        message_id: str | None = None,
    ) -> RoomEvent:
        last = select(func.max(RoomEvent.position)).where(
            RoomEvent.tenant_id == self.tenant_id, RoomEvent.room_id == room.id
        )
        position = (self.session.scalar(last) or 0) + 1
        row = RoomEvent(
            room_id=room.id,
            position=position,
            kind=kind,
            character_id=character_id,
            message_id=message_id,
        )
        return self._add(row)

    def events(self, room: Room) -> Sequence[RoomEvent]:
        query = self._select(RoomEvent).where(RoomEvent.room_id == room.id)
        return self.session.scalars(query.order_by(RoomEvent.position)).all()

    def speaker_of(self, message_id: str) -> str | None:
        """The character who said a room message (None: the user, or not a room message)."""
        query = self._select(RoomEvent).where(RoomEvent.message_id == message_id)
        event = self.session.scalars(query).first()
        return None if event is None else event.character_id

    def present_character_ids(self, room: Room) -> list[str]:
        """Characters in the room now, in the order they first joined (from the log)."""
        present: dict[str, bool] = {}
        for event in self.events(room):
            if event.character_id is not None and event.kind != RoomEventKind.MESSAGE:
                present[event.character_id] = event.kind == RoomEventKind.JOIN
        return [character_id for character_id, here in present.items() if here]

    def speakers(self, room: Room) -> dict[str, str | None]:
        """Message id -> the character who said it (None: the user), for every room message."""
        return {
            event.message_id: event.character_id
            for event in self.events(room)
            if event.kind == RoomEventKind.MESSAGE and event.message_id is not None
        }
