"""Request and response bodies of the admin API (`XCreate` in, `XPublic` out)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from talkloop.server.db.models import KeyScope


class Public(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)


class TenantCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)


class TenantPublic(Public):
    id: str
    name: str
    created_at: datetime
    disabled_at: datetime | None


class KeyCreate(BaseModel):
    name: str = Field(default="", max_length=200)
    scope: KeyScope = KeyScope.USER


class KeyPublic(Public):
    id: str
    tenant_id: str
    name: str
    prefix: str
    scope: KeyScope
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyPublic):
    key: str = Field(description="the secret; shown only in this response")
