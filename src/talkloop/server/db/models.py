"""The platform's tables as typed SQLAlchemy 2 models (one migration history for all backends).

Every tenant-owned row carries `tenant_id`; the store layer filters on it for every query.
The usage ledger is append-only and keeps plain ids (no foreign keys), so deleting a key,
end-user or tenant never rewrites the metering history.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from talkloop.server.db.base import ID_LENGTH, Base, JsonType, created_at_column, id_column, utcnow

NAME_LENGTH = 200
EXTERNAL_ID_LENGTH = 256


class KeyScope(StrEnum):
    ADMIN = "admin"  # manages tenants and keys, and may use the API as its tenant
    USER = "user"  # uses the API as its tenant


class MessageStatus(StrEnum):
    COMPLETE = "complete"
    STREAMING = "streaming"  # being generated now
    INCOMPLETE = "incomplete"  # the stream broke (disconnect, error, shutdown)


class UsageStatus(StrEnum):
    OK = "ok"
    CLIENT_DISCONNECTED = "client_disconnected"
    ERROR = "error"  # failed after generation was admitted
    REJECTED = "rejected"  # refused before generation (bad input, overload)


def _tenant_fk() -> Mapped[str]:
    return mapped_column(
        String(ID_LENGTH), ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = id_column("ten")
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    created_at: Mapped[datetime] = created_at_column()
    disabled_at: Mapped[datetime | None] = mapped_column(default=None)


class AuthEpoch(Base):
    """One row whose value database triggers bump on every change to `api_keys` or `tenants`
    (migration 0004): a cached authentication is valid while the value is unchanged."""

    __tablename__ = "auth_epoch"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    value: Mapped[int] = mapped_column(BigInteger)


class ApiKey(Base):
    """An API key; only its SHA-256 hash is stored, and its visible prefix for display."""

    __tablename__ = "api_keys"

    id: Mapped[str] = id_column("key")
    tenant_id: Mapped[str] = _tenant_fk()
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), default="")
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16), default=KeyScope.USER)
    created_at: Mapped[datetime] = created_at_column()
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class EndUser(Base):
    """A tenant's own user, named by the tenant (OpenAI `user` or `X-Talkloop-User`)."""

    __tablename__ = "end_users"
    __table_args__ = (UniqueConstraint("tenant_id", "external_id"),)

    id: Mapped[str] = id_column("usr")
    tenant_id: Mapped[str] = _tenant_fk()
    external_id: Mapped[str] = mapped_column(String(EXTERNAL_ID_LENGTH))
    created_at: Mapped[datetime] = created_at_column()


class Character(Base):
    """A character card (its V3 `data` as spec JSON in `card`), addressable by id or slug."""

    __tablename__ = "characters"
    __table_args__ = (UniqueConstraint("tenant_id", "slug"),)

    id: Mapped[str] = id_column("chr")
    tenant_id: Mapped[str] = _tenant_fk()
    slug: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    card: Mapped[dict[str, Any]] = mapped_column(JsonType)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Conversation(Base):
    """A conversation tree; `active_leaf_id` is the message the current branch ends at."""

    __tablename__ = "conversations"

    id: Mapped[str] = id_column("conv")
    tenant_id: Mapped[str] = _tenant_fk()
    end_user_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("end_users.id", ondelete="CASCADE"), index=True
    )
    character_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("characters.id", ondelete="SET NULL"), index=True
    )
    title: Mapped[str] = mapped_column(String(NAME_LENGTH), default="")
    active_leaf_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), default=None)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Message(Base):
    """One node of a conversation tree. NOTE: `content` is `swipes[swipe_index]` when
    `swipes` is non-empty; a regenerated reply appends a swipe instead of a sibling row."""

    __tablename__ = "messages"

    id: Mapped[str] = id_column("msg")
    tenant_id: Mapped[str] = _tenant_fk()
    conversation_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    parent_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(NAME_LENGTH), default=None)
    content: Mapped[str] = mapped_column(Text, default="")
    swipes: Mapped[list[str]] = mapped_column(JsonType, default=list)
    swipe_index: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default=MessageStatus.COMPLETE)
    created_at: Mapped[datetime] = created_at_column()


class Feedback(Base):
    __tablename__ = "feedback"

    id: Mapped[str] = id_column("fb")
    tenant_id: Mapped[str] = _tenant_fk()
    message_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    end_user_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("end_users.id", ondelete="CASCADE"), index=True
    )
    rating: Mapped[int] = mapped_column(Integer)
    swipe_index: Mapped[int | None] = mapped_column(Integer, default=None)
    comment: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = created_at_column()


class UsageRecord(Base):
    """One metered request; `request_id` makes writing it idempotent."""

    __tablename__ = "usage_ledger"
    __table_args__ = (Index("ix_usage_ledger_tenant_id_created_at", "tenant_id", "created_at"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    api_key_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    end_user: Mapped[str | None] = mapped_column(String(EXTERNAL_ID_LENGTH))
    model: Mapped[str] = mapped_column(String(NAME_LENGTH))
    character_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    endpoint: Mapped[str] = mapped_column(String(64))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(32))
    cost_micros: Mapped[int] = mapped_column(BigInteger, default=0)  # 1e-6 of the price currency
    created_at: Mapped[datetime] = created_at_column()


class Price(Base):
    """Price per million tokens of a model; `tenant_id` NULL is the default for every tenant."""

    __tablename__ = "prices"
    __table_args__ = (UniqueConstraint("tenant_id", "model", "effective_from"),)

    id: Mapped[str] = id_column("price")
    tenant_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    model: Mapped[str] = mapped_column(String(NAME_LENGTH))
    prompt_per_mtok: Mapped[Decimal] = mapped_column(Numeric(18, 6))
    cached_prompt_per_mtok: Mapped[Decimal] = mapped_column(Numeric(18, 6))
    completion_per_mtok: Mapped[Decimal] = mapped_column(Numeric(18, 6))
    currency: Mapped[str] = mapped_column(String(3), default="USD")
    effective_from: Mapped[datetime] = mapped_column(default=utcnow)


TENANT_SCOPED_MODELS: tuple[type[Base], ...] = (
    ApiKey,
    EndUser,
    Character,
    Conversation,
    Message,
    Feedback,
)
"""Rows only their own tenant may see (the isolation tests walk this list)."""
