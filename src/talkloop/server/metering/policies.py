"""What admins configure: prices, quotas and per-key rate limits (create, replace, list).

Quotas and rate limits are set by (tenant, key) with `PUT` semantics: setting again replaces.
Prices are appended with an `effective_from`, so the history of prices stays. Whoever commits a
change calls `changed()`, so this process's admission drops what it cached at once (other
replicas within `policy_cache_ttl_s`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from talkloop.server.db.base import utcnow
from talkloop.server.db.metering_tables import (
    WHOLE_TENANT,
    KeyRateLimit,
    Quota,
    QuotaCounter,
)
from talkloop.server.db.models import Price
from talkloop.server.errors import ConflictError, NotFoundError
from talkloop.server.metering.prices import default_cached_price
from talkloop.server.metering.quotas import period_start
from talkloop.server.store import PlatformStore

_generation = itertools.count(1)
_current = 0


def generation() -> int:
    """Bumped by `changed()`: a cached policy older than this is stale."""
    return _current


def changed() -> None:
    """Call after committing a change of prices, quotas or rate limits."""
    global _current
    _current = next(_generation)


def add_price(
    session: Session,
    *,
    model: str,
    tenant_id: str | None,
    prompt: Decimal,
    cached_prompt: Decimal | None,
    completion: Decimal,
    currency: str,
    effective_from: datetime | None,
) -> Price:
    if tenant_id is not None:
        PlatformStore(session).get_tenant(tenant_id)
    row = Price(
        tenant_id=tenant_id,
        model=model,
        prompt_per_mtok=prompt,
        cached_prompt_per_mtok=cached_prompt if cached_prompt is not None else
        default_cached_price(prompt),
        completion_per_mtok=completion,
        currency=currency,
        effective_from=effective_from or utcnow(),
    )  # fmt: skip
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        raise ConflictError(f"a price for {model!r} from {row.effective_from} exists") from None
    return row


def _scope(session: Session, tenant_id: str, api_key_id: str | None) -> str:
    """The key column value; the key must belong to the tenant."""
    store = PlatformStore(session).tenant_store(tenant_id)
    if api_key_id is None:
        return WHOLE_TENANT
    return store.keys.get(api_key_id).id


def set_quota(
    session: Session,
    tenant_id: str,
    api_key_id: str | None,
    period: str,
    max_tokens: int | None,
    max_cost_micros: int | None,
) -> Quota:
    scope = _scope(session, tenant_id, api_key_id)
    query = select(Quota).where(
        Quota.tenant_id == tenant_id, Quota.api_key_id == scope, Quota.period == period
    )
    row = session.scalars(query).first()
    if row is None:
        row = Quota(tenant_id=tenant_id, api_key_id=scope, period=period)
        session.add(row)
    row.max_tokens = max_tokens
    row.max_cost_micros = max_cost_micros
    session.flush()
    return row


def list_quotas(session: Session, tenant_id: str) -> Sequence[Quota]:
    query = select(Quota).where(Quota.tenant_id == tenant_id).order_by(Quota.created_at)
    return session.scalars(query).all()


def delete_quota(session: Session, tenant_id: str, quota_id: str) -> None:
    row = session.get(Quota, quota_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFoundError(f"no quota with id {quota_id!r}")
    session.delete(row)
    session.flush()


@dataclass(frozen=True)
class QuotaStatus:
    quota: Quota
    period_start: datetime
    counter: QuotaCounter | None  # None: nothing used this period yet


def quota_statuses(session: Session, tenant_id: str) -> list[QuotaStatus]:
    now = utcnow()
    statuses = []
    for quota in list_quotas(session, tenant_id):
        start = period_start(quota.period, now)
        query = select(QuotaCounter).where(
            QuotaCounter.quota_id == quota.id, QuotaCounter.period_start == start
        )
        statuses.append(QuotaStatus(quota, start, session.scalars(query).first()))
    return statuses


def set_rate_limit(
    session: Session,
    tenant_id: str,
    api_key_id: str | None,
    requests_per_minute: int | None,
    tokens_per_minute: int | None,
) -> KeyRateLimit:
    scope = _scope(session, tenant_id, api_key_id)
    query = select(KeyRateLimit).where(
        KeyRateLimit.tenant_id == tenant_id, KeyRateLimit.api_key_id == scope
    )
    row = session.scalars(query).first()
    if row is None:
        row = KeyRateLimit(tenant_id=tenant_id, api_key_id=scope)
        session.add(row)
    row.requests_per_minute = requests_per_minute
    row.tokens_per_minute = tokens_per_minute
    session.flush()
    return row


def list_rate_limits(session: Session, tenant_id: str) -> Sequence[KeyRateLimit]:
    query = select(KeyRateLimit).where(KeyRateLimit.tenant_id == tenant_id)
    return session.scalars(query.order_by(KeyRateLimit.api_key_id)).all()
