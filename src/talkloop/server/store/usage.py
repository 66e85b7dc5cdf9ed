"""The usage ledger: idempotent inserts (one row per request id) and per-tenant reads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from talkloop.server.db.models import UsageRecord
from talkloop.server.store.scoped import Scoped


def _insert_ignoring_duplicates(dialect: str) -> Insert:
    if dialect == "postgresql":
        return postgresql.insert(UsageRecord).on_conflict_do_nothing(index_elements=["request_id"])
    if dialect == "sqlite":
        return sqlite.insert(UsageRecord).on_conflict_do_nothing(index_elements=["request_id"])
    raise ValueError(f"the usage ledger supports sqlite and postgresql, not {dialect}")


def insert_usage(session: Session, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write ledger rows; a request id already written is skipped (retries are safe)."""
    values = [dict(row) for row in rows]
    if values:
        session.execute(_insert_ignoring_duplicates(session.get_bind().dialect.name), values)


class UsageRepo(Scoped):
    def find(self, request_id: str) -> UsageRecord | None:
        query = self._select(UsageRecord).where(UsageRecord.request_id == request_id)
        return self.session.scalars(query).first()

    def recent(self, limit: int = 100) -> Sequence[UsageRecord]:
        query = self._select(UsageRecord).order_by(UsageRecord.id.desc()).limit(limit)
        return self.session.scalars(query).all()
