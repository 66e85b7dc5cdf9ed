"""First-start set-up: the default tenant, an admin key, and the bundled characters.

Idempotent: a later start finds everything in place and changes nothing. On PostgreSQL an
advisory lock keeps replicas that start together from bootstrapping twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import text

from talkloop.characters.bundled import bundled_character_ids, load_bundled_character
from talkloop.server.db.database import Database
from talkloop.server.db.models import KeyScope
from talkloop.server.settings import Settings
from talkloop.server.store import PlatformStore, TenantStore

logger = logging.getLogger(__name__)

PG_BOOTSTRAP_LOCK = 0x74616C6C


@dataclass(frozen=True)
class BootstrapResult:
    default_tenant_id: str
    created_admin_key: str | None  # the secret, when this start created the admin key
    created_tenant: bool


def bootstrap(db: Database, settings: Settings) -> BootstrapResult:
    with db.session() as session:
        if db.dialect == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": PG_BOOTSTRAP_LOCK})
        platform = PlatformStore(session)
        tenant = platform.tenant_by_name(settings.default_tenant)
        created_tenant = tenant is None
        if tenant is None:
            tenant = platform.create_tenant(settings.default_tenant)
        store = TenantStore(session, tenant.id)
        admin_key = _ensure_admin_key(platform, store, settings)
        if created_tenant and settings.load_bundled_characters:
            _load_bundled_characters(store)
        return BootstrapResult(tenant.id, admin_key, created_tenant)


def _ensure_admin_key(
    platform: PlatformStore, store: TenantStore, settings: Settings
) -> str | None:
    """Import the configured admin key, or create one if no admin key exists yet."""
    if settings.admin_key is not None:
        secret = settings.admin_key.get_secret_value()
        if platform.key_by_secret(secret) is None:
            store.keys.import_secret(secret, "bootstrap admin (from settings)", KeyScope.ADMIN)
        return None
    if platform.has_admin_key():
        return None
    created = store.keys.create("bootstrap admin", KeyScope.ADMIN)
    logger.warning("created the first admin key %s... (shown once)", created.row.prefix)
    return created.secret


def _load_bundled_characters(store: TenantStore) -> None:
    for character_id in bundled_character_ids():
        store.characters.create(character_id, load_bundled_character(character_id))
    logger.info("loaded %d bundled characters", len(bundled_character_ids()))
