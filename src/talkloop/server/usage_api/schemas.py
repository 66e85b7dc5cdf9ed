"""Bodies of the usage and metering admin routes (`XSet`/`XCreate` in, `XPublic` out).

Money is integer micro-units (`*_micros`) or six-decimal strings (prices); never floats.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, model_validator

from talkloop.server.metering.quotas import Period
from talkloop.server.metering.summaries import GroupBy

SIX_PLACES = Decimal("0.000001")


def six_places(value: Decimal) -> str:
    return str(value.quantize(SIX_PLACES))


PricePerMtok = Annotated[
    Decimal,
    Field(ge=0, max_digits=18, decimal_places=6),
    PlainSerializer(six_places, return_type=str),
]


class Public(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)


class PriceCreate(BaseModel):
    model: str = Field(min_length=1, max_length=200)
    tenant_id: str | None = Field(default=None, description="None: the default for all tenants")
    prompt_per_mtok: PricePerMtok
    cached_prompt_per_mtok: PricePerMtok | None = Field(
        default=None, description="None: half the prompt price"
    )
    completion_per_mtok: PricePerMtok
    currency: str = Field(default="USD", pattern="^[A-Z]{3}$")
    effective_from: datetime | None = None


class PricePublic(Public):
    id: str
    tenant_id: str | None
    model: str
    prompt_per_mtok: PricePerMtok
    cached_prompt_per_mtok: PricePerMtok
    completion_per_mtok: PricePerMtok
    currency: str
    effective_from: datetime


class QuotaSet(BaseModel):
    tenant_id: str
    api_key_id: str | None = Field(default=None, description="None: the whole tenant")
    period: Period = Period.MONTH
    max_tokens: int | None = Field(default=None, ge=0)
    max_cost_micros: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _needs_a_cap(self) -> QuotaSet:
        if self.max_tokens is None and self.max_cost_micros is None:
            raise ValueError("set max_tokens, max_cost_micros or both")
        return self


class QuotaPublic(BaseModel):
    id: str
    tenant_id: str
    api_key_id: str | None
    period: Period
    max_tokens: int | None
    max_cost_micros: int | None


class QuotaStatusPublic(QuotaPublic):
    period_start: datetime
    used_tokens: int
    used_cost_micros: int
    reserved_tokens: int
    reserved_cost_micros: int


class RateLimitSet(BaseModel):
    tenant_id: str
    api_key_id: str | None = Field(default=None, description="None: each key of the tenant")
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)


class RateLimitPublic(BaseModel):
    id: str
    tenant_id: str
    api_key_id: str | None
    requests_per_minute: int | None
    tokens_per_minute: int | None


class UsageLinePublic(BaseModel):
    period: str
    group: str | None
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_micros: int


class UsageSummary(BaseModel):
    tenant_id: str
    start: datetime = Field(serialization_alias="from")
    end: datetime = Field(serialization_alias="to")
    period: Period
    group_by: GroupBy
    data: list[UsageLinePublic]
