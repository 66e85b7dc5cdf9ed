"""Admin routes for metering: prices (`/api/admin/prices`), quotas and per-key rate limits."""

from __future__ import annotations

from fastapi import APIRouter

from talkloop.server.auth import AdminDep
from talkloop.server.db.metering_tables import KeyRateLimit, Quota
from talkloop.server.deps import SessionDep
from talkloop.server.metering import policies, prices
from talkloop.server.metering.quotas import Period
from talkloop.server.store import PlatformStore
from talkloop.server.usage_api.schemas import (
    PriceCreate,
    PricePublic,
    QuotaPublic,
    QuotaSet,
    RateLimitPublic,
    RateLimitSet,
)

router = APIRouter(prefix="/admin", tags=["admin"])


@router.post("/prices", status_code=201)
def create_price(body: PriceCreate, _admin: AdminDep, session: SessionDep) -> PricePublic:
    row = policies.add_price(
        session,
        model=body.model,
        tenant_id=body.tenant_id,
        prompt=body.prompt_per_mtok,
        cached_prompt=body.cached_prompt_per_mtok,
        completion=body.completion_per_mtok,
        currency=body.currency,
        effective_from=body.effective_from,
    )
    session.commit()
    policies.changed()
    return PricePublic.model_validate(row)


@router.get("/prices")
def list_prices(
    _admin: AdminDep, session: SessionDep, tenant_id: str | None = None
) -> list[PricePublic]:
    return [PricePublic.model_validate(row) for row in prices.list_prices(session, tenant_id)]


def quota_public(row: Quota) -> QuotaPublic:
    return QuotaPublic(
        id=row.id,
        tenant_id=row.tenant_id,
        api_key_id=row.api_key_id or None,
        period=Period(row.period),
        max_tokens=row.max_tokens,
        max_cost_micros=row.max_cost_micros,
    )


@router.put("/quotas")
def set_quota(body: QuotaSet, _admin: AdminDep, session: SessionDep) -> QuotaPublic:
    row = policies.set_quota(
        session, body.tenant_id, body.api_key_id, body.period, body.max_tokens,
        body.max_cost_micros,
    )  # fmt: skip
    session.commit()
    policies.changed()
    return quota_public(row)


@router.get("/quotas")
def list_quotas(tenant_id: str, _admin: AdminDep, session: SessionDep) -> list[QuotaPublic]:
    PlatformStore(session).get_tenant(tenant_id)
    return [quota_public(row) for row in policies.list_quotas(session, tenant_id)]


@router.delete("/quotas/{quota_id}", status_code=204)
def delete_quota(quota_id: str, tenant_id: str, _admin: AdminDep, session: SessionDep) -> None:
    policies.delete_quota(session, tenant_id, quota_id)
    session.commit()
    policies.changed()


def rate_limit_public(row: KeyRateLimit) -> RateLimitPublic:
    return RateLimitPublic(
        id=row.id,
        tenant_id=row.tenant_id,
        api_key_id=row.api_key_id or None,
        requests_per_minute=row.requests_per_minute,
        tokens_per_minute=row.tokens_per_minute,
    )


@router.put("/rate-limits")
def set_rate_limit(body: RateLimitSet, _admin: AdminDep, session: SessionDep) -> RateLimitPublic:
    row = policies.set_rate_limit(
        session, body.tenant_id, body.api_key_id, body.requests_per_minute,
        body.tokens_per_minute,
    )  # fmt: skip
    session.commit()
    policies.changed()
    return rate_limit_public(row)


@router.get("/rate-limits")
def list_rate_limits(
    tenant_id: str, _admin: AdminDep, session: SessionDep
) -> list[RateLimitPublic]:
    PlatformStore(session).get_tenant(tenant_id)
    return [rate_limit_public(row) for row in policies.list_rate_limits(session, tenant_id)]
