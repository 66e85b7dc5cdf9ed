"""`PlatformStore`: the few queries that are above any one tenant.

Tenants themselves (admin only), key lookup by hash (authentication, before the tenant is
known), and opening a tenant's `TenantStore`. Nothing else may query across tenants.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from talkloop.server.db.models import ApiKey, KeyScope, Tenant
from talkloop.server.errors import ConflictError, NotFoundError
from talkloop.server.keys import hash_api_key
from talkloop.server.store.tenant import TenantStore


class PlatformStore:
    def __init__(self, session: Session) -> None:
        self.session = session

    def create_tenant(self, name: str) -> Tenant:
        row = Tenant(name=name)
        try:
            with self.session.begin_nested():
                self.session.add(row)
                self.session.flush()
        except IntegrityError:
            raise ConflictError(f"a tenant named {name!r} already exists", param="name") from None
        return row

    def get_tenant(self, tenant_id: str) -> Tenant:
        row = self.session.get(Tenant, tenant_id)
        if row is None:
            raise NotFoundError(f"no tenant with id {tenant_id!r}")
        return row

    def tenant_by_name(self, name: str) -> Tenant | None:
        return self.session.scalars(select(Tenant).where(Tenant.name == name)).first()

    def list_tenants(self) -> Sequence[Tenant]:
        return self.session.scalars(select(Tenant).order_by(Tenant.created_at)).all()

    def tenant_store(self, tenant_id: str) -> TenantStore:
        """The store of an existing tenant (NotFoundError otherwise)."""
        return TenantStore(self.session, self.get_tenant(tenant_id).id)

    def key_and_tenant(self, secret: str) -> tuple[ApiKey, Tenant] | None:
        """The key whose hash matches `secret` and its tenant (revoked or not), in one query."""
        query = (
            select(ApiKey, Tenant)
            .join(Tenant, Tenant.id == ApiKey.tenant_id)
            .where(ApiKey.key_hash == hash_api_key(secret))
        )
        found = self.session.execute(query).first()
        return None if found is None else (found[0], found[1])

    def key_by_secret(self, secret: str) -> ApiKey | None:
        """The key whose hash matches `secret`, revoked or not."""
        query = select(ApiKey).where(ApiKey.key_hash == hash_api_key(secret))
        return self.session.scalars(query).first()

    def has_admin_key(self) -> bool:
        query = select(ApiKey.id).where(ApiKey.scope == KeyScope.ADMIN, ApiKey.revoked_at.is_(None))
        return self.session.scalars(query.limit(1)).first() is not None
