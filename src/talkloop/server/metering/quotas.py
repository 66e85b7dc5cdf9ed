"""Quotas and budgets: reserve before generation, settle when the ledger row is written.

A quota caps a tenant's (or one key's) tokens and/or cost per UTC day or month. Admission
holds a reservation (the request's worst case: its prompt plus `max_tokens` per choice) with
one conditional UPDATE per quota, admitted iff `used + reserved < max` beforehand; the ledger
writer releases it and adds the actual usage in the transaction that writes the row.

NOTE, the overspend bound: when a request R is admitted, `used + reserved < max`, and every
request in flight holds at least what it will use. So the final total is below
`max + reservation(R)` for the last admitted R: concurrent requests overspend a quota by less
than one request's reservation (its prompt tokens + max_tokens x n), never by their sum.
A reservation whose ledger row is dropped (the database down for every retry) stays held.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import Insert, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from talkloop.server.db.base import utcnow
from talkloop.server.db.database import Database
from talkloop.server.db.metering_tables import (
    WHOLE_TENANT,
    Quota,
    QuotaCounter,
    QuotaReservation,
)
from talkloop.server.errors import QuotaExceededError
from talkloop.server.ledger import UsageEntry


class Period(StrEnum):
    DAY = "day"
    MONTH = "month"


PERIOD_STARTS: dict[Period, Callable[[datetime], datetime]] = {
    Period.DAY: lambda t: t.replace(hour=0, minute=0, second=0, microsecond=0),
    Period.MONTH: lambda t: t.replace(day=1, hour=0, minute=0, second=0, microsecond=0),
}


def period_start(period: str, now: datetime) -> datetime:
    return PERIOD_STARTS[Period(period)](now)


@dataclass(frozen=True)
class Charge:
    """What a request may spend at most (reserved) or did spend (settled)."""

    tokens: int
    micros: int


def quotas_for(session: Session, tenant_id: str, api_key_id: str | None) -> Sequence[Quota]:
    """The tenant's own quotas and those of this key."""
    scopes = [WHOLE_TENANT] if api_key_id is None else [WHOLE_TENANT, api_key_id]
    query = select(Quota).where(Quota.tenant_id == tenant_id, Quota.api_key_id.in_(scopes))
    return session.scalars(query).all()


def _insert_counter(dialect: str, quota_id: str, start: datetime) -> Insert:
    """INSERT of an empty counter that does nothing when it exists (SQLite, PostgreSQL)."""
    values = {
        "quota_id": quota_id,
        "period_start": start,
        "used_tokens": 0,
        "used_micros": 0,
        "reserved_tokens": 0,
        "reserved_micros": 0,
    }
    if dialect == "postgresql":
        return postgresql.insert(QuotaCounter).values(values).on_conflict_do_nothing()
    return sqlite.insert(QuotaCounter).values(values).on_conflict_do_nothing()


def _exceeded(quota: Quota, start: datetime) -> QuotaExceededError:
    owner = "the tenant's" if quota.api_key_id == WHOLE_TENANT else f"key {quota.api_key_id}'s"
    caps = [f"{quota.max_tokens} tokens"] if quota.max_tokens is not None else []
    if quota.max_cost_micros is not None:
        caps.append(f"{quota.max_cost_micros} micro-units of cost")
    return QuotaExceededError(
        f"you exceeded {owner} {quota.period}ly quota ({' and '.join(caps)}) for the period "
        f"starting {start.date().isoformat()}; ask an admin to raise it or wait for the next "
        "period"
    )


class QuotaBook:
    def __init__(self, db: Database, clock: Callable[[], datetime] = utcnow) -> None:
        self._db = db
        self._clock = clock

    def reserve(self, quotas: Sequence[Quota], request_id: str, charge: Charge) -> None:
        """Hold `charge` on every quota, or raise QuotaExceededError holding nothing."""
        now = self._clock()
        with self._db.session() as session:
            for quota in quotas:
                start = period_start(quota.period, now)
                counter_id = self._counter_id(session, quota.id, start)
                if not self._hold(session, quota, counter_id, charge):
                    raise _exceeded(quota, start)  # the transaction rolls back every hold
                held = QuotaReservation(
                    request_id=request_id,
                    counter_id=counter_id,
                    tokens=charge.tokens,
                    micros=charge.micros,
                )
                session.add(held)

    def _counter_id(self, session: Session, quota_id: str, start: datetime) -> int:
        # NOTE: the insert comes first so SQLite takes its write lock before any read.
        session.execute(_insert_counter(self._db.dialect, quota_id, start))
        query = select(QuotaCounter.id).where(
            QuotaCounter.quota_id == quota_id, QuotaCounter.period_start == start
        )
        return session.scalars(query).one()

    def _hold(self, session: Session, quota: Quota, counter_id: int, charge: Charge) -> bool:
        """One atomic conditional UPDATE: concurrent holds serialize on the counter row."""
        conditions = [QuotaCounter.id == counter_id]
        if quota.max_tokens is not None:
            used = QuotaCounter.used_tokens + QuotaCounter.reserved_tokens
            conditions.append(used < quota.max_tokens)
        if quota.max_cost_micros is not None:
            spent = QuotaCounter.used_micros + QuotaCounter.reserved_micros
            conditions.append(spent < quota.max_cost_micros)
        statement = (
            update(QuotaCounter)
            .where(*conditions)
            .values(
                reserved_tokens=QuotaCounter.reserved_tokens + charge.tokens,
                reserved_micros=QuotaCounter.reserved_micros + charge.micros,
            )
            .execution_options(synchronize_session=False)
        )
        return session.execute(statement).rowcount == 1  # type: ignore[attr-defined,no-any-return]


def take_reservations(session: Session, request_ids: Sequence[str]) -> list[QuotaReservation]:
    """Delete and return the reservations of these requests (a write first, for SQLite)."""
    if not request_ids:
        return []
    statement = (
        delete(QuotaReservation)
        .where(QuotaReservation.request_id.in_(request_ids))
        .returning(QuotaReservation)
    )
    return list(session.scalars(statement).all())


def settle(
    session: Session, reservations: Sequence[QuotaReservation], entries: Sequence[UsageEntry]
) -> None:
    """Release each reservation and count its request's actual tokens and cost instead."""
    by_request = {entry.request_id: entry for entry in entries}
    for held in reservations:
        entry = by_request[held.request_id]
        session.execute(
            update(QuotaCounter)
            .where(QuotaCounter.id == held.counter_id)
            .values(
                reserved_tokens=QuotaCounter.reserved_tokens - held.tokens,
                reserved_micros=QuotaCounter.reserved_micros - held.micros,
                used_tokens=QuotaCounter.used_tokens
                + entry.prompt_tokens
                + entry.completion_tokens,
                used_micros=QuotaCounter.used_micros + entry.cost_micros,
            )
            .execution_options(synchronize_session=False)
        )
