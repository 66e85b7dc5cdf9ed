"""Admin routes: create and list tenants; create, list and revoke a tenant's API keys."""

from __future__ import annotations

from fastapi import APIRouter

from talkloop.server.admin_api.schemas import (
    KeyCreate,
    KeyCreated,
    KeyPublic,
    TenantCreate,
    TenantPublic,
)
from talkloop.server.auth import AdminDep
from talkloop.server.deps import SessionDep
from talkloop.server.errors import ERROR_RESPONSES
from talkloop.server.store import PlatformStore

router = APIRouter(prefix="/admin", tags=["admin"], responses=ERROR_RESPONSES)


@router.post("/tenants", status_code=201)
def create_tenant(body: TenantCreate, _admin: AdminDep, session: SessionDep) -> TenantPublic:
    row = PlatformStore(session).create_tenant(body.name)
    session.commit()
    return TenantPublic.model_validate(row)


@router.get("/tenants")
def list_tenants(_admin: AdminDep, session: SessionDep) -> list[TenantPublic]:
    return [TenantPublic.model_validate(row) for row in PlatformStore(session).list_tenants()]


@router.get("/tenants/{tenant_id}")
def get_tenant(tenant_id: str, _admin: AdminDep, session: SessionDep) -> TenantPublic:
    return TenantPublic.model_validate(PlatformStore(session).get_tenant(tenant_id))


@router.post("/tenants/{tenant_id}/keys", status_code=201)
def create_key(
    tenant_id: str, body: KeyCreate, _admin: AdminDep, session: SessionDep
) -> KeyCreated:
    created = PlatformStore(session).tenant_store(tenant_id).keys.create(body.name, body.scope)
    session.commit()
    return KeyCreated.model_validate(
        {**KeyPublic.model_validate(created.row).model_dump(), "key": created.secret}
    )


@router.get("/tenants/{tenant_id}/keys")
def list_keys(tenant_id: str, _admin: AdminDep, session: SessionDep) -> list[KeyPublic]:
    keys = PlatformStore(session).tenant_store(tenant_id).keys.all()
    return [KeyPublic.model_validate(row) for row in keys]


@router.delete("/tenants/{tenant_id}/keys/{key_id}")
def revoke_key(tenant_id: str, key_id: str, _admin: AdminDep, session: SessionDep) -> KeyPublic:
    row = PlatformStore(session).tenant_store(tenant_id).keys.revoke(key_id)
    session.commit()
    return KeyPublic.model_validate(row)
