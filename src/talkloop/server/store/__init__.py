"""Data access: every query is scoped by tenant here, never in routes.

`TenantStore(session, tenant_id)` groups one repository per noun; `PlatformStore` holds the
few cross-tenant queries (tenants, key lookup). A row of another tenant raises NotFoundError.
"""

from talkloop.server.store.keys import CreatedKey
from talkloop.server.store.platform import PlatformStore
from talkloop.server.store.scoped import Scoped
from talkloop.server.store.tenant import TenantStore

__all__ = ["CreatedKey", "PlatformStore", "Scoped", "TenantStore"]
