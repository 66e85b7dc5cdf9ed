"""Who is calling: API key authentication on every request, scopes, and the end-user.

Keys are looked up by hash on every request (no cache), so a revocation takes effect on
every replica at once: one query in one worker-thread hop, with its own short session (a
route that needs the database opens its own). Admin keys manage tenants and keys and may use
the API as their own tenant; user keys use the API. The end-user comes from `X-Talkloop-User`
(or OpenAI `user`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Annotated

from fastapi import Depends, Request

from talkloop.server.db.database import Database
from talkloop.server.db.models import KeyScope
from talkloop.server.deps import ServicesDep, SessionDep
from talkloop.server.errors import AuthenticationError, BadRequestError, PermissionDeniedError
from talkloop.server.keys import MAX_KEY_CHARS, key_prefix
from talkloop.server.store import PlatformStore, TenantStore

END_USER_HEADER = "X-Talkloop-User"
MAX_END_USER_CHARS = 256


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    key_id: str
    scope: KeyScope
    end_user: str | None = None  # the tenant's own id for its user, if the request names one

    @property
    def is_admin(self) -> bool:
        return self.scope is KeyScope.ADMIN

    def acting_for(self, end_user: str | None) -> Principal:
        """This principal on behalf of `end_user` (a body `user` field wins over the header)."""
        if end_user is None:
            return self
        return replace(self, end_user=check_end_user(end_user, "user"))


def check_end_user(value: str, param: str) -> str:
    if not value or len(value) > MAX_END_USER_CHARS:
        raise BadRequestError(
            f"{param} must be 1 to {MAX_END_USER_CHARS} characters, got {len(value)}", param=param
        )
    return value


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise AuthenticationError(
            "missing API key: send it as `Authorization: Bearer tl-...`", code="missing_api_key"
        )
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("malformed Authorization header: expected `Bearer <API key>`")
    return token.strip()


def look_up_key(db: Database, secret: str) -> Principal:
    """The principal `secret` authenticates (no end-user yet); raises 401 or 403."""
    with db.session() as session:
        found = PlatformStore(session).key_and_tenant(secret)
        if found is None:
            raise AuthenticationError(f"incorrect API key provided: {key_prefix(secret)}...")
        key, tenant = found
        if key.revoked_at is not None:
            raise AuthenticationError(
                f"API key {key.prefix}... was revoked", code="revoked_api_key"
            )
        if tenant.disabled_at is not None:
            raise PermissionDeniedError(
                f"tenant {tenant.name!r} is disabled", code="tenant_disabled"
            )
        return Principal(tenant.id, key.id, KeyScope(key.scope))


async def authenticate(request: Request, services: ServicesDep) -> Principal:
    secret = bearer_token(request)
    if len(secret) > MAX_KEY_CHARS:
        raise AuthenticationError("incorrect API key provided")
    header_user = request.headers.get(END_USER_HEADER)
    end_user = check_end_user(header_user, END_USER_HEADER) if header_user is not None else None
    principal = await asyncio.to_thread(look_up_key, services.db, secret)
    return replace(principal, end_user=end_user)


PrincipalDep = Annotated[Principal, Depends(authenticate)]


async def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise PermissionDeniedError("this route needs an admin API key")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]


def tenant_store(principal: PrincipalDep, session: SessionDep) -> TenantStore:
    """The caller's own tenant: the only data a route may reach with these credentials."""
    return TenantStore(session, principal.tenant_id)


StoreDep = Annotated[TenantStore, Depends(tenant_store)]
