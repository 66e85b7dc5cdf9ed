"""Usage reports of one tenant from the ledger: totals per day or month, grouped, and CSV.

Every query filters on the tenant first; the period label is computed by the database
(`strftime` on SQLite, `to_char` on PostgreSQL) from the UTC timestamps the ledger stores.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, func, literal, select
from sqlalchemy.orm import Session

from talkloop.server.db.models import UsageRecord
from talkloop.server.metering.quotas import Period


class GroupBy(StrEnum):
    NONE = "none"
    MODEL = "model"
    CHARACTER = "character"
    KEY = "key"
    END_USER = "end_user"
    ENDPOINT = "endpoint"
    STATUS = "status"


GROUP_COLUMNS: dict[GroupBy, Any] = {
    GroupBy.MODEL: UsageRecord.model,
    GroupBy.CHARACTER: UsageRecord.character_id,
    GroupBy.KEY: UsageRecord.api_key_id,
    GroupBy.END_USER: UsageRecord.end_user,
    GroupBy.ENDPOINT: UsageRecord.endpoint,
    GroupBy.STATUS: UsageRecord.status,
}


PeriodLabel = Callable[[Period], ColumnElement[str]]
SQLITE_FORMATS = {Period.DAY: "%Y-%m-%d", Period.MONTH: "%Y-%m"}
PG_FORMATS = {Period.DAY: "YYYY-MM-DD", Period.MONTH: "YYYY-MM"}
PERIOD_LABELS: dict[str, PeriodLabel] = {
    "sqlite": lambda p: func.strftime(SQLITE_FORMATS[p], UsageRecord.created_at),
    "postgresql": lambda p: func.to_char(UsageRecord.created_at, PG_FORMATS[p]),
}


@dataclass(frozen=True)
class UsageLine:
    period: str  # "2025-07-01" (day) or "2025-07" (month), UTC
    group: str | None  # the model, character id, key id ... (None: no grouping or unset)
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_micros: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _in_range(tenant_id: str, start: datetime, end: datetime) -> list[ColumnElement[bool]]:
    return [
        UsageRecord.tenant_id == tenant_id,
        UsageRecord.created_at >= start,
        UsageRecord.created_at < end,
    ]


def summarize(
    session: Session,
    tenant_id: str,
    start: datetime,
    end: datetime,
    period: Period,
    group_by: GroupBy,
) -> list[UsageLine]:
    """One line per (period, group) in [start, end), ordered by period then group."""
    label = PERIOD_LABELS[session.get_bind().dialect.name](period).label("period")
    group = GROUP_COLUMNS.get(group_by, literal(None)).label("grp")
    query = (
        select(
            label,
            group,
            func.count(),
            func.sum(UsageRecord.prompt_tokens),
            func.sum(UsageRecord.cached_tokens),
            func.sum(UsageRecord.completion_tokens),
            func.sum(UsageRecord.cost_micros),
        )
        .where(*_in_range(tenant_id, start, end))
        .group_by(label, group)
        .order_by(label, group)
    )
    return [
        UsageLine(row[0], row[1], *(int(value or 0) for value in row[2:]))
        for row in session.execute(query)
    ]


CSV_COLUMNS = (
    "created_at", "request_id", "api_key_id", "end_user", "model", "character_id", "endpoint",
    "status", "prompt_tokens", "cached_tokens", "completion_tokens", "total_tokens",
    "latency_ms", "cost_micros",
)  # fmt: skip


def ledger_page(
    session: Session, tenant_id: str, start: datetime, end: datetime, after_id: int, limit: int
) -> Sequence[UsageRecord]:
    """Ledger rows in [start, end) with id > `after_id`, oldest id first (keyset paging)."""
    query = (
        select(UsageRecord)
        .where(*_in_range(tenant_id, start, end), UsageRecord.id > after_id)
        .order_by(UsageRecord.id)
        .limit(limit)
    )
    return session.scalars(query).all()


def csv_text(rows: Iterable[Sequence[object]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    return buffer.getvalue()


def csv_row(record: UsageRecord) -> list[object]:
    return [
        record.created_at.isoformat(),
        record.request_id,
        record.api_key_id or "",
        record.end_user or "",
        record.model,
        record.character_id or "",
        record.endpoint,
        record.status,
        record.prompt_tokens,
        record.cached_tokens,
        record.completion_tokens,
        record.prompt_tokens + record.completion_tokens,
        record.latency_ms,
        record.cost_micros,
    ]
