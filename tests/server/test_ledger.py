"""The usage ledger writer: rows land off the response path, once per request id."""

from __future__ import annotations

import dataclasses

from sqlalchemy import func, select

from talkloop.backends.base import Usage
from talkloop.server.db.database import Database
from talkloop.server.db.models import UsageRecord, UsageStatus
from talkloop.server.ledger import Meter, UsageEntry, UsageLedger

ENTRY = UsageEntry(
    request_id="req-1",
    tenant_id="ten_a",
    api_key_id="key_a",
    end_user="alice",
    model="smollm2",
    character_id=None,
    endpoint="chat.completions",
    prompt_tokens=11,
    cached_tokens=3,
    completion_tokens=7,
    latency_ms=42,
    status=UsageStatus.OK,
)


def _rows(db: Database) -> list[UsageRecord]:
    with db.session() as session:
        return list(session.scalars(select(UsageRecord).order_by(UsageRecord.id)))


def test_recorded_entry_is_written_exactly(db: Database) -> None:
    ledger = UsageLedger(db, flush_interval_s=0.01)
    ledger.record(ENTRY)
    assert ledger.flush(10)
    ledger.close()
    [row] = _rows(db)
    assert (row.request_id, row.tenant_id, row.api_key_id, row.end_user) == (
        "req-1",
        "ten_a",
        "key_a",
        "alice",
    )
    assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (11, 3, 7)
    assert (row.latency_ms, row.status, row.endpoint) == (42, "ok", "chat.completions")
    assert row.created_at == ENTRY.created_at


def test_a_request_id_is_written_once_even_when_recorded_again(db: Database) -> None:
    ledger = UsageLedger(db, flush_interval_s=0.01)
    ledger.record(ENTRY)
    ledger.record(dataclasses.replace(ENTRY, completion_tokens=999))  # same batch
    assert ledger.flush(10)
    ledger.record(dataclasses.replace(ENTRY, completion_tokens=555))  # a later batch
    ledger.close()
    [row] = _rows(db)
    assert row.completion_tokens == 7


def test_many_requests_are_batched(db: Database) -> None:
    ledger = UsageLedger(db, flush_interval_s=0.05)
    for i in range(250):
        ledger.record(dataclasses.replace(ENTRY, request_id=f"req-{i}"))
    ledger.close()
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(UsageRecord)) == 250


def test_meter_records_one_row_with_the_last_usage(db: Database) -> None:
    ledger = UsageLedger(db, flush_interval_s=0.01)
    meter = Meter(ledger, dataclasses.replace(ENTRY, request_id="req-m", prompt_tokens=0))
    meter.usage = Usage(prompt_tokens=20, completion_tokens=4, cached_tokens=16)
    meter.finish(UsageStatus.CLIENT_DISCONNECTED)
    meter.finish(UsageStatus.OK)  # ignored: one row per request
    ledger.close()
    [row] = _rows(db)
    assert (row.prompt_tokens, row.completion_tokens, row.cached_tokens) == (20, 4, 16)
    assert row.status == "client_disconnected"
    assert 0 <= row.latency_ms < 5_000
