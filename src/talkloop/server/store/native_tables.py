"""Tables the native API (`/api`) adds in migration 0002: world books, personas, rooms,
feedback events, and the links that give characters and conversations their extras.

NOTE: they live here, not in `db/models.py`, only because that module has another owner;
they share `Base`, so `Base.metadata` (and autogenerate) sees them once this is imported.
Every row carries `tenant_id`, and `end_user_id` where an end-user owns it.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from talkloop.server.db.base import ID_LENGTH, Base, JsonType, created_at_column, id_column, utcnow
from talkloop.server.db.models import NAME_LENGTH


def _fk(target: str, ondelete: str = "CASCADE", *, nullable: bool = False) -> Mapped[Any]:
    return mapped_column(
        String(ID_LENGTH), ForeignKey(target, ondelete=ondelete), index=True, nullable=nullable
    )


def _tenant_fk() -> Mapped[str]:
    return _fk("tenants.id")


def _end_user_fk() -> Mapped[str | None]:
    return _fk("end_users.id", nullable=True)


class FeedbackKind(StrEnum):
    RATING = "rating"  # stars, thumbs, free text and tags given by the user
    SWIPE = "swipe"  # the user chose another alternative of a reply
    EDIT = "edit"  # the user rewrote a reply (original and edited text kept)


class RoomEventKind(StrEnum):
    JOIN = "join"
    LEAVE = "leave"
    MESSAGE = "message"


class CharacterOwner(Base):
    """A character created by an end-user: only that end-user sees it (others: tenant-wide).
    `id` is the character's id."""

    __tablename__ = "character_owners"

    id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("characters.id", ondelete="CASCADE"), primary_key=True
    )
    tenant_id: Mapped[str] = _tenant_fk()
    end_user_id: Mapped[str] = _fk("end_users.id")


class CharacterAvatar(Base):
    """A character's picture (the PNG a card came in, or an uploaded one); `id` is its id."""

    __tablename__ = "character_avatars"

    id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("characters.id", ondelete="CASCADE"), primary_key=True
    )
    tenant_id: Mapped[str] = _tenant_fk()
    media_type: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column()


class WorldBook(Base):
    """A standalone lorebook (`lorebook_v3` `data` in `book`)."""

    __tablename__ = "world_books"

    id: Mapped[str] = id_column("wb")
    tenant_id: Mapped[str] = _tenant_fk()
    end_user_id: Mapped[str | None] = _end_user_fk()
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    book: Mapped[dict[str, Any]] = mapped_column(JsonType)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class CharacterWorldBook(Base):
    """A world book attached to a character: its lore joins every prompt of that character."""

    __tablename__ = "character_world_books"
    __table_args__ = (UniqueConstraint("character_id", "world_book_id"),)

    id: Mapped[str] = id_column("cwb")
    tenant_id: Mapped[str] = _tenant_fk()
    character_id: Mapped[str] = _fk("characters.id")
    world_book_id: Mapped[str] = _fk("world_books.id")
    created_at: Mapped[datetime] = created_at_column()


class Persona(Base):
    """Who an end-user is in a chat (name and description for the prompt)."""

    __tablename__ = "personas"

    id: Mapped[str] = id_column("per")
    tenant_id: Mapped[str] = _tenant_fk()
    end_user_id: Mapped[str | None] = _end_user_fk()
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ConversationPersona(Base):
    """The persona a conversation uses; `id` is the conversation's id."""

    __tablename__ = "conversation_personas"

    id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
    )
    tenant_id: Mapped[str] = _tenant_fk()
    persona_id: Mapped[str | None] = _fk("personas.id", "SET NULL", nullable=True)


class Room(Base):
    """A group chat: a conversation (character_id NULL) plus its members and turn strategy."""

    __tablename__ = "rooms"

    id: Mapped[str] = id_column("room")
    tenant_id: Mapped[str] = _tenant_fk()
    end_user_id: Mapped[str | None] = _end_user_fk()
    conversation_id: Mapped[str] = _fk("conversations.id")
    title: Mapped[str] = mapped_column(String(NAME_LENGTH), default="")
    strategy: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = created_at_column()


class RoomEvent(Base):
    """The room's ordered log: joins, leaves and who said each message (replayed into a
    `characters.rooms.Room` to decide presence, visibility and the next speaker)."""

    __tablename__ = "room_events"
    __table_args__ = (UniqueConstraint("room_id", "position"),)

    id: Mapped[str] = id_column("rev")
    tenant_id: Mapped[str] = _tenant_fk()
    room_id: Mapped[str] = _fk("rooms.id")
    position: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    character_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), default=None)
    message_id: Mapped[str | None] = _fk("messages.id", nullable=True)
    created_at: Mapped[datetime] = created_at_column()


class FeedbackEvent(Base):
    """One signal about one message: a rating (stars 1-4, thumbs +1/-1, text, tags), a swipe
    choice (from, to) or an edit (original, edited, editor). The flywheel reads these."""

    __tablename__ = "feedback_events"

    id: Mapped[str] = id_column("fbe")
    tenant_id: Mapped[str] = _tenant_fk()
    conversation_id: Mapped[str] = _fk("conversations.id")
    message_id: Mapped[str] = _fk("messages.id")
    end_user_id: Mapped[str | None] = _end_user_fk()
    character_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), default=None)
    kind: Mapped[str] = mapped_column(String(16))
    stars: Mapped[int | None] = mapped_column(Integer, default=None)
    thumbs: Mapped[int | None] = mapped_column(Integer, default=None)
    text: Mapped[str | None] = mapped_column(Text, default=None)
    tags: Mapped[list[str]] = mapped_column(JsonType, default=list)
    swipe_index: Mapped[int | None] = mapped_column(Integer, default=None)
    previous_swipe_index: Mapped[int | None] = mapped_column(Integer, default=None)
    original_text: Mapped[str | None] = mapped_column(Text, default=None)
    edited_text: Mapped[str | None] = mapped_column(Text, default=None)
    editor: Mapped[str | None] = mapped_column(String(NAME_LENGTH), default=None)
    created_at: Mapped[datetime] = created_at_column()


NATIVE_TENANT_SCOPED_MODELS: tuple[type[Base], ...] = (
    CharacterOwner,
    CharacterAvatar,
    WorldBook,
    CharacterWorldBook,
    Persona,
    ConversationPersona,
    Room,
    RoomEvent,
    FeedbackEvent,
)
