"""The usage ledger writer: metering rows written off the response path, in batches.

`UsageLedger.record` never blocks (it may be called from a cancelled stream's `finally`);
a writer thread inserts batches idempotently by request id, retrying on database errors.
`Meter` measures one request and records exactly one row, whatever way the request ends.
`MeterHooks` let other subsystems (limits, quotas, pricing, metrics) act on every request.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.orm import Session

from talkloop.backends.base import GenerationRequest, Usage
from talkloop.server.db.base import utcnow
from talkloop.server.db.database import Database
from talkloop.server.db.models import UsageStatus
from talkloop.server.store.usage import insert_usage

logger = logging.getLogger(__name__)

MAX_BATCH_ROWS = 500
WRITE_ATTEMPTS = 3


@dataclass(frozen=True)
class UsageEntry:
    request_id: str
    tenant_id: str
    api_key_id: str | None
    end_user: str | None
    model: str
    character_id: str | None
    endpoint: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    latency_ms: int
    status: UsageStatus
    created_at: datetime = field(default_factory=utcnow)
    cost_micros: int = 0  # set by the hooks' pricing when the row is written


class MeterHooks(Protocol):
    """What runs around every metered request; see `metering.hooks.Metering`."""

    async def admit(self, entry: UsageEntry, request: GenerationRequest) -> None:
        """Before generation; raise a ServerError (a 429) to refuse the request."""
        ...

    def on_chunk(self, entry: UsageEntry, since_start_s: float, since_last_s: float | None) -> None:
        """Each chunk handed on (`since_last_s` None for the first); must be cheap."""
        ...

    def on_scheduled(self, entry: UsageEntry, queue_time_s: float) -> None:
        """Once, when the backend reports how long the request queued before it ran."""
        ...

    def on_finish(self, entry: UsageEntry) -> None:
        """Once, after the row is queued; must not block."""
        ...

    def before_write(self, session: Session, entries: Sequence[UsageEntry]) -> list[UsageEntry]:
        """In the writer's transaction, before the insert: the rows to write."""
        ...


class NoHooks:
    async def admit(self, entry: UsageEntry, request: GenerationRequest) -> None:
        return None

    def on_chunk(self, entry: UsageEntry, since_start_s: float, since_last_s: float | None) -> None:
        return None

    def on_scheduled(self, entry: UsageEntry, queue_time_s: float) -> None:
        return None

    def on_finish(self, entry: UsageEntry) -> None:
        return None

    def before_write(self, session: Session, entries: Sequence[UsageEntry]) -> list[UsageEntry]:
        return list(entries)


class UsageLedger:
    def __init__(
        self, db: Database, flush_interval_s: float = 0.2, hooks: MeterHooks | None = None
    ) -> None:
        self._db = db
        self.hooks: MeterHooks = hooks or NoHooks()
        self._interval_s = flush_interval_s
        self._queue: queue.SimpleQueue[UsageEntry | None] = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="talkloop-ledger", daemon=True)
        self._thread.start()

    def record(self, entry: UsageEntry) -> None:
        """Queue one row; returns at once."""
        with self._idle:
            self._pending += 1
        self._queue.put(entry)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every recorded row is written (or given up); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self.flush(timeout_s)
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first, *self._drain(MAX_BATCH_ROWS - 1)]
            stop = None in batch
            entries = [entry for entry in batch if entry is not None]
            self._write(entries)
            with self._idle:
                self._pending -= len(entries)
                self._idle.notify_all()
            if stop:
                return

    def _drain(self, limit: int) -> list[UsageEntry | None]:
        deadline = time.monotonic() + self._interval_s
        items: list[UsageEntry | None] = []
        while len(items) < limit:
            try:
                items.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
            if items[-1] is None:
                break
        return items

    def _write(self, entries: list[UsageEntry]) -> None:
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self._db.session() as session:
                    written = self.hooks.before_write(session, entries)
                    insert_usage(session, [_row(entry) for entry in written])
                return
            except Exception:
                logger.warning("usage ledger write failed (attempt %d)", attempt, exc_info=True)
                time.sleep(0.2 * attempt)
        rows = [_row(entry) for entry in entries]
        logger.error("usage ledger rows dropped after %d attempts: %s", WRITE_ATTEMPTS, rows)


_ENTRY_FIELDS = tuple(f.name for f in dataclasses.fields(UsageEntry))


def _row(entry: UsageEntry) -> dict[str, Any]:
    """The entry's columns (its fields are scalars: no deep copy, which `asdict` makes)."""
    return {name: getattr(entry, name) for name in _ENTRY_FIELDS}


class Caller(Protocol):
    """Who is metered (an `auth.Principal`)."""

    @property
    def tenant_id(self) -> str: ...
    @property
    def key_id(self) -> str: ...
    @property
    def end_user(self) -> str | None: ...


class Meter:
    """Measures one request; `finish` records its single ledger row (later calls do nothing)."""

    @classmethod
    def start(
        cls,
        ledger: UsageLedger,
        caller: Caller,
        request_id: str,
        *,
        model: str,
        endpoint: str,
        character_id: str | None = None,
    ) -> Meter:
        """A meter whose row starts at zero tokens and status ok."""
        template = UsageEntry(
            request_id=request_id,
            tenant_id=caller.tenant_id,
            api_key_id=caller.key_id,
            end_user=caller.end_user,
            model=model,
            character_id=character_id,
            endpoint=endpoint,
            prompt_tokens=0,
            cached_tokens=0,
            completion_tokens=0,
            latency_ms=0,
            status=UsageStatus.OK,
        )
        return cls(ledger, template)

    def __init__(self, ledger: UsageLedger, template: UsageEntry) -> None:
        self._ledger = ledger
        self._template = template
        self._start = time.perf_counter()
        self.usage = Usage(0, 0, 0)
        self._done = False
        self._last_chunk: float | None = None

    async def admit(self, request: GenerationRequest) -> None:
        """Rate limits and quotas (the hooks may raise a 429); call before generating."""
        await self._ledger.hooks.admit(self._template, request)

    def chunk(self) -> None:
        """Note that a chunk was handed on (time to first token, inter-token latency)."""
        now = time.perf_counter()
        since_last = None if self._last_chunk is None else now - self._last_chunk
        self._last_chunk = now
        try:
            self._ledger.hooks.on_chunk(self._template, now - self._start, since_last)
        except Exception:
            logger.warning("meter hook on_chunk failed", exc_info=True)

    def scheduled(self, queue_time_s: float) -> None:
        """Note how long the backend queued the request before running it."""
        try:
            self._ledger.hooks.on_scheduled(self._template, queue_time_s)
        except Exception:
            logger.warning("meter hook on_scheduled failed", exc_info=True)

    def finish(self, status: UsageStatus) -> None:
        if self._done:
            return
        self._done = True
        entry = dataclasses.replace(
            self._template,
            prompt_tokens=self.usage.prompt_tokens,
            cached_tokens=self.usage.cached_tokens,
            completion_tokens=self.usage.completion_tokens,
            latency_ms=round((time.perf_counter() - self._start) * 1000),
            status=status,
            created_at=utcnow(),
        )
        self._ledger.record(entry)
        try:
            self._ledger.hooks.on_finish(entry)
        except Exception:
            logger.warning("meter hook on_finish failed", exc_info=True)
