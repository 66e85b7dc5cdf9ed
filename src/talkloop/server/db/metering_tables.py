"""Tables of limits and quotas: what an admin configured, and the live quota counters.

`api_key_id = ""` means "every key of the tenant" (a sentinel, not NULL, so the unique
constraints hold on SQLite and PostgreSQL alike). Counters are per quota and per period.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from talkloop.server.db.base import ID_LENGTH, Base, created_at_column, id_column

WHOLE_TENANT = ""
BIG_ID = BigInteger().with_variant(Integer(), "sqlite")


def _tenant_fk() -> Mapped[str]:
    return mapped_column(
        String(ID_LENGTH), ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )


class Quota(Base):
    """A hard cap per period on a tenant's (or one key's) tokens and/or cost."""

    __tablename__ = "quotas"
    __table_args__ = (UniqueConstraint("tenant_id", "api_key_id", "period"),)

    id: Mapped[str] = id_column("quota")
    tenant_id: Mapped[str] = _tenant_fk()
    api_key_id: Mapped[str] = mapped_column(String(ID_LENGTH), default=WHOLE_TENANT)
    period: Mapped[str] = mapped_column(String(8))  # "day" | "month" (UTC)
    max_tokens: Mapped[int | None] = mapped_column(BigInteger, default=None)
    max_cost_micros: Mapped[int | None] = mapped_column(BigInteger, default=None)
    created_at: Mapped[datetime] = created_at_column()


class KeyRateLimit(Base):
    """Requests and tokens per minute for each key of a tenant, or for one key."""

    __tablename__ = "rate_limits"
    __table_args__ = (UniqueConstraint("tenant_id", "api_key_id"),)

    id: Mapped[str] = id_column("rl")
    tenant_id: Mapped[str] = _tenant_fk()
    api_key_id: Mapped[str] = mapped_column(String(ID_LENGTH), default=WHOLE_TENANT)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, default=None)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer, default=None)


class QuotaCounter(Base):
    """What one quota has used (settled) and holds (reserved by requests in flight)."""

    __tablename__ = "quota_counters"
    __table_args__ = (UniqueConstraint("quota_id", "period_start"),)

    id: Mapped[int] = mapped_column(BIG_ID, primary_key=True, autoincrement=True)
    quota_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("quotas.id", ondelete="CASCADE"), index=True
    )
    period_start: Mapped[datetime]
    used_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    used_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved_micros: Mapped[int] = mapped_column(BigInteger, default=0)


class QuotaReservation(Base):
    """A request's hold on one counter until its ledger row settles it."""

    __tablename__ = "quota_reservations"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    counter_id: Mapped[int] = mapped_column(
        BIG_ID, ForeignKey("quota_counters.id", ondelete="CASCADE"), primary_key=True
    )
    tokens: Mapped[int] = mapped_column(BigInteger)
    micros: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = created_at_column()
