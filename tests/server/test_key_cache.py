"""The authentication cache: the auth epoch's triggers (both databases), and a cache that
serves a key until any process changes keys or tenants (SQLite), never past a revocation."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from talkloop.server import auth
from talkloop.server.auth import KeyCache, Principal, principal_for
from talkloop.server.db.base import utcnow
from talkloop.server.db.database import Database
from talkloop.server.db.migrate import upgrade
from talkloop.server.db.models import AuthEpoch, KeyScope, Tenant
from talkloop.server.errors import AuthenticationError, PermissionDeniedError
from talkloop.server.store import PlatformStore


def epoch(db: Database) -> int:
    with db.session() as session:
        return int(session.scalars(select(AuthEpoch.value)).one())


def new_key(db: Database, name: str) -> tuple[str, str]:
    """A tenant and a user key for it: (tenant id, secret)."""
    with db.session() as session:
        platform = PlatformStore(session)
        tenant = platform.create_tenant(name)
        created = platform.tenant_store(tenant.id).keys.create("k", KeyScope.USER)
        return tenant.id, created.secret


def test_every_change_to_keys_or_tenants_moves_the_epoch_and_nothing_else(db: Database) -> None:
    start = epoch(db)
    tenant_id, _secret = new_key(db, "acme")
    after_create = epoch(db)
    assert after_create > start
    with db.session() as session:  # another tenant-owned table: no move
        PlatformStore(session).tenant_store(tenant_id).end_users.ensure("user-1")
    assert epoch(db) == after_create
    with db.session() as session:
        store = PlatformStore(session).tenant_store(tenant_id)
        store.keys.revoke(store.keys.all()[0].id)
    after_revoke = epoch(db)
    assert after_revoke > after_create
    with db.session() as session:
        session.get_one(Tenant, tenant_id).disabled_at = utcnow()
    assert epoch(db) > after_revoke


def test_the_cache_is_for_sqlite_files_only(db: Database) -> None:
    cache = KeyCache.for_database(db)
    assert (cache is not None) == (db.dialect == "sqlite")
    if cache is not None:
        assert cache.epoch() == epoch(db)
        cache.close()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'cache.db'}")
    upgrade(database.engine)
    yield database
    database.dispose()


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The secrets `look_up_key` was really called with (it still runs)."""
    calls: list[str] = []
    real = auth.look_up_key

    def counting(db: Database, secret: str) -> Principal:
        calls.append(secret)
        return real(db, secret)

    monkeypatch.setattr(auth, "look_up_key", counting)
    return calls


@pytest.fixture
def cache(sqlite_db: Database) -> Iterator[KeyCache]:
    made = KeyCache.for_database(sqlite_db)
    assert made is not None
    yield made
    made.close()


def authenticate(db: Database, cache: KeyCache, secret: str) -> Principal:
    return asyncio.run(principal_for(db, cache, secret))


def test_a_key_is_served_from_the_cache_until_another_process_revokes_it(
    sqlite_db: Database, cache: KeyCache, lookups: list[str]
) -> None:
    tenant_id, secret = new_key(sqlite_db, "acme")
    first = authenticate(sqlite_db, cache, secret)
    assert authenticate(sqlite_db, cache, secret) == first
    assert first.tenant_id == tenant_id and lookups == [secret]  # the second came from memory

    # Revoked by another process, in plain SQL: the triggers still move the epoch.
    path = sqlite_db.engine.url.database
    script = (
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
        "c.execute(\"UPDATE api_keys SET revoked_at = '2026-01-01 00:00:00'\"); c.commit()"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    with pytest.raises(AuthenticationError, match="revoked"):
        authenticate(sqlite_db, cache, secret)
    with pytest.raises(AuthenticationError, match="revoked"):  # failures are never cached
        authenticate(sqlite_db, cache, secret)
    assert lookups == [secret] * 3


def test_a_disabled_tenant_is_refused_on_the_next_request(
    sqlite_db: Database, cache: KeyCache, lookups: list[str]
) -> None:
    tenant_id, secret = new_key(sqlite_db, "acme")
    other_id, other = new_key(sqlite_db, "globex")
    authenticate(sqlite_db, cache, secret)
    authenticate(sqlite_db, cache, other)
    with sqlite_db.session() as session:
        session.get_one(Tenant, tenant_id).disabled_at = utcnow()
    with pytest.raises(PermissionDeniedError):
        authenticate(sqlite_db, cache, secret)
    assert authenticate(sqlite_db, cache, other).tenant_id == other_id  # looked up again
    assert lookups == [secret, other, secret, other]


def test_unknown_keys_are_looked_up_every_time_and_work_once_created(
    sqlite_db: Database, cache: KeyCache, lookups: list[str]
) -> None:
    with sqlite_db.session() as session:
        tenant = PlatformStore(session).create_tenant("acme")
        tenant_id = tenant.id
    secret = "tl-" + "x" * 43
    for _ in range(2):
        with pytest.raises(AuthenticationError, match="incorrect API key"):
            authenticate(sqlite_db, cache, secret)
    with sqlite_db.session() as session:
        keys = PlatformStore(session).tenant_store(tenant_id).keys
        keys.import_secret(secret, "k", KeyScope.USER)
    assert authenticate(sqlite_db, cache, secret).tenant_id == tenant_id
    assert len(lookups) == 3


def test_an_unreadable_epoch_means_a_lookup_not_a_failure(
    sqlite_db: Database, cache: KeyCache, lookups: list[str]
) -> None:
    _tenant_id, secret = new_key(sqlite_db, "acme")
    cache._connection.close()  # e.g. the file went away under it
    with pytest.raises(sqlite3.ProgrammingError):
        cache._connection.execute("SELECT 1")
    for _ in range(2):
        authenticate(sqlite_db, cache, secret)
    assert lookups == [secret, secret]


def test_the_cache_keeps_its_most_recent_keys(cache: KeyCache) -> None:
    cache.MAX_ENTRIES = 2
    principals = [Principal(f"ten-{i}", f"key-{i}", KeyScope.USER) for i in range(3)]
    for i, principal in enumerate(principals):
        cache.put(f"hash-{i}", 7, principal)
        if i == 1:
            assert cache.get("hash-0", 7) == principals[0]  # used: now the most recent
    assert cache.get("hash-1", 7) is None  # the least recently used went first
    assert cache.get("hash-0", 7) == principals[0] and cache.get("hash-2", 7) == principals[2]
    assert cache.get("hash-2", 8) is None  # another epoch: stale
