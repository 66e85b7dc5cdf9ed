"""`GET /api/usage`, `/api/usage/quotas`, `/api/usage/export.csv`: the caller's tenant's
usage (an admin key may name another tenant with `tenant_id`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import BeforeValidator
from sqlalchemy.orm import Session

from talkloop.server.auth import Principal, PrincipalDep
from talkloop.server.deps import ServicesDep, SessionDep
from talkloop.server.errors import BadRequestError, PermissionDeniedError
from talkloop.server.metering import policies, summaries
from talkloop.server.metering.quotas import Period
from talkloop.server.metering.summaries import GroupBy
from talkloop.server.services import Services
from talkloop.server.store import PlatformStore
from talkloop.server.usage_api.schemas import QuotaStatusPublic, UsageLinePublic, UsageSummary

router = APIRouter(prefix="/usage", tags=["usage"])
CSV_PAGE_ROWS = 1000


def _not_a_timestamp(value: object) -> object:
    """Refuses a number: pydantic would read it as Unix seconds, the API takes ISO 8601."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return value
        raise ValueError(f"expected an ISO 8601 date or date-time, got {value!r}")
    return value


IsoDateTime = Annotated[datetime, BeforeValidator(_not_a_timestamp)]
FromQuery = Annotated[IsoDateTime | None, Query(alias="from", description="inclusive, UTC")]
ToQuery = Annotated[IsoDateTime | None, Query(alias="to", description="exclusive, UTC")]


def target_tenant(session: Session, principal: Principal, tenant_id: str | None) -> str:
    """The caller's tenant, or (admin keys only) the tenant it names."""
    if tenant_id is None or tenant_id == principal.tenant_id:
        return principal.tenant_id
    if not principal.is_admin:
        raise PermissionDeniedError("only an admin key may read another tenant's usage")
    return PlatformStore(session).get_tenant(tenant_id).id


def time_range(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    """[from, to) in UTC; default: this month so far (to: tomorrow)."""
    now = datetime.now(UTC)
    start = _utc(start) if start else now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = _utc(end) if end else now + timedelta(days=1)
    if end <= start:
        raise BadRequestError("`to` must be after `from`", param="to")
    return start, end


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@router.get("")
def get_usage(
    principal: PrincipalDep,
    session: SessionDep,
    start: FromQuery = None,
    end: ToQuery = None,
    period: Period = Period.DAY,
    group_by: GroupBy = GroupBy.NONE,
    tenant_id: str | None = None,
) -> UsageSummary:
    tenant = target_tenant(session, principal, tenant_id)
    begin, stop = time_range(start, end)
    lines = summaries.summarize(session, tenant, begin, stop, period, group_by)
    data = [UsageLinePublic(**vars(line), total_tokens=line.total_tokens) for line in lines]
    return UsageSummary(
        tenant_id=tenant, start=begin, end=stop, period=period, group_by=group_by, data=data
    )


@router.get("/quotas")
def get_quota_status(
    principal: PrincipalDep, session: SessionDep, tenant_id: str | None = None
) -> list[QuotaStatusPublic]:
    tenant = target_tenant(session, principal, tenant_id)
    return [
        QuotaStatusPublic(
            id=s.quota.id,
            tenant_id=s.quota.tenant_id,
            api_key_id=s.quota.api_key_id or None,
            period=Period(s.quota.period),
            max_tokens=s.quota.max_tokens,
            max_cost_micros=s.quota.max_cost_micros,
            period_start=s.period_start,
            used_tokens=s.counter.used_tokens if s.counter else 0,
            used_cost_micros=s.counter.used_micros if s.counter else 0,
            reserved_tokens=s.counter.reserved_tokens if s.counter else 0,
            reserved_cost_micros=s.counter.reserved_micros if s.counter else 0,
        )
        for s in policies.quota_statuses(session, tenant)
    ]


@router.get(
    "/export.csv",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}}},
)
def export_csv(
    principal: PrincipalDep,
    session: SessionDep,
    services: ServicesDep,
    start: FromQuery = None,
    end: ToQuery = None,
    tenant_id: str | None = None,
) -> StreamingResponse:
    tenant = target_tenant(session, principal, tenant_id)
    begin, stop = time_range(start, end)
    name = f"usage-{tenant}-{begin:%Y%m%d}-{stop:%Y%m%d}.csv"
    return StreamingResponse(
        _csv_pages(services, tenant, begin, stop),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


async def _csv_pages(
    services: Services, tenant_id: str, start: datetime, end: datetime
) -> AsyncIterator[str]:
    """The header, then pages of rows, each read in a worker thread with its own session."""
    yield summaries.csv_text([summaries.CSV_COLUMNS])
    after_id = 0
    while True:
        rows, after_id = await asyncio.to_thread(_page, services, tenant_id, start, end, after_id)
        if not rows:
            return
        yield summaries.csv_text(rows)


def _page(
    services: Services, tenant_id: str, start: datetime, end: datetime, after_id: int
) -> tuple[list[list[object]], int]:
    with services.db.session() as session:
        page = summaries.ledger_page(session, tenant_id, start, end, after_id, CSV_PAGE_ROWS)
        last = page[-1].id if page else after_id
        return [summaries.csv_row(record) for record in page], last
