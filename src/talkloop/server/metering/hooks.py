"""`Metering`: the ledger's `MeterHooks` for the whole platform.

Before generation: rate limits and quota reservations (`Admission`, in a worker thread).
While it streams and when it ends: serving metrics (cheap, in-process). In the ledger
writer's transaction: release reservations, price each row, settle quotas.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

from sqlalchemy.orm import Session

from talkloop.backends.base import GenerationRequest
from talkloop.server.db.base import utcnow
from talkloop.server.db.database import Database
from talkloop.server.ledger import UsageEntry
from talkloop.server.limits import RateLimiter, build_limiter
from talkloop.server.metering.admission import Admission, KeyLimits
from talkloop.server.metering.prices import RateCache
from talkloop.server.metering.quotas import QuotaBook, settle, take_reservations
from talkloop.server.metrics import ServingMetrics
from talkloop.server.model_registry import ModelRegistry
from talkloop.server.settings import Settings


class Metering:
    def __init__(self, admission: Admission, limiter: RateLimiter, metrics: ServingMetrics) -> None:
        self._admission = admission
        self._limiter = limiter
        self._metrics = metrics

    async def admit(self, entry: UsageEntry, request: GenerationRequest) -> None:
        cached = self._admission.cached_policy(entry)
        if cached is not None and cached.free:
            return  # nothing to check or hold: no worker-thread hop
        await asyncio.to_thread(self._admission.admit, entry, request)

    def on_chunk(self, entry: UsageEntry, since_start_s: float, since_last_s: float | None) -> None:
        self._metrics.observe_chunk(entry.model, since_start_s, since_last_s)

    def on_scheduled(self, entry: UsageEntry, queue_time_s: float) -> None:
        self._metrics.queue_time.labels(entry.model).observe(queue_time_s)

    def on_finish(self, entry: UsageEntry) -> None:
        self._metrics.observe_finish(entry)

    def before_write(self, session: Session, entries: Sequence[UsageEntry]) -> list[UsageEntry]:
        held = take_reservations(session, [entry.request_id for entry in entries])
        prices = RateCache(session, utcnow())
        priced = [price_entry(prices, entry) for entry in entries]
        settle(session, held, priced)
        return priced

    def close(self) -> None:
        self._limiter.close()


def price_entry(prices: RateCache, entry: UsageEntry) -> UsageEntry:
    rates = prices.rates(entry.tenant_id, entry.model)
    cost = rates.cost_micros(entry.prompt_tokens, entry.cached_tokens, entry.completion_tokens)
    return replace(entry, cost_micros=cost)


def build_metering(
    settings: Settings, db: Database, models: ModelRegistry, metrics: ServingMetrics
) -> Metering:
    """Limits from `settings` (Redis-backed when `redis_url` is set), quotas in `db`."""
    limiter = build_limiter(settings.redis_url, settings.redis_prefix)
    defaults = KeyLimits(
        settings.rate_limit_requests_per_minute, settings.rate_limit_tokens_per_minute
    )
    backends = {backend.model_name: backend for backend in models.backends}
    admission = Admission(
        db, limiter, QuotaBook(db), backends, defaults, settings.policy_cache_ttl_s
    )
    return Metering(admission, limiter, metrics)
