"""Server fixtures: databases (SQLite and a fresh PostgreSQL database per session), the bundled
model, and a real uvicorn server on a free port that the official `openai` client talks to.

Every fixture that touches a database is parametrized over both backends.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import select

from talkloop.backends.engine_backend import AdmissionLimits, EngineBackend
from talkloop.engine.config import EngineConfig
from talkloop.engine.loader import build_engine, load_model
from talkloop.server import Settings, create_app
from talkloop.server.db.database import Database
from talkloop.server.db.migrate import upgrade
from talkloop.server.db.models import UsageRecord
from talkloop.server.services import Services
from talkloop.server.store import PlatformStore

PG_ADMIN_URL = os.environ.get("TALKLOOP_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MODEL = "smollm2"
TINY_MODEL = "smollm2-one-at-a-time"  # admits one request: the overload tests use it
DB_KINDS = ["sqlite", "postgresql"]


@dataclass
class PgDatabase:
    name: str

    @property
    def url(self) -> str:
        base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        return f"{base}/{self.name}"


def _pg_admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(sql)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pg_database() -> Iterator[PgDatabase]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    database = PgDatabase(f"talkloop_test_{secrets.token_hex(6)}")
    _pg_admin(f"CREATE DATABASE {database.name}")
    yield database
    _pg_admin(f"DROP DATABASE IF EXISTS {database.name} WITH (FORCE)")


def database_url(kind: str, tmp: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp / 'talkloop.db'}"
    pg: PgDatabase = request.getfixturevalue("pg_database")
    schema_db = PgDatabase(f"{pg.name}_{secrets.token_hex(3)}")
    _pg_admin(f"CREATE DATABASE {schema_db.name}")
    request.addfinalizer(
        lambda: _pg_admin(f"DROP DATABASE IF EXISTS {schema_db.name} WITH (FORCE)")
    )
    return schema_db.url


@pytest.fixture(params=DB_KINDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated, empty database of each kind (per test)."""
    database = Database(database_url(request.param, tmp_path, request))
    upgrade(database.engine)
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def engine_backend() -> Iterator[EngineBackend]:
    """The bundled model as `talkloop serve` runs it: the engine in a process of its own."""
    backend = EngineBackend.from_config(EngineConfig(dtype="auto"), MODEL, process=True)
    yield backend
    asyncio.run(backend.close())


@pytest.fixture(scope="session")
def tiny_backend() -> Iterator[EngineBackend]:
    """The same weights behind an engine on a thread here that admits a single request."""
    config = EngineConfig(dtype="auto", num_threads=1)
    loaded = load_model(config)
    backend = EngineBackend.from_engine(
        loaded, build_engine(config, loaded), TINY_MODEL, AdmissionLimits(max_queued_requests=1)
    )
    yield backend
    asyncio.run(backend.close())


class ThreadedServer:
    """uvicorn serving `app` on 127.0.0.1 from a thread."""

    def __init__(self, app: FastAPI) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, args=([self.socket],), daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@dataclass
class LiveServer:
    base_url: str
    app: FastAPI
    admin_key: str
    db_kind: str

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    def http(self, key: str | None = None, **headers: str) -> httpx.Client:
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)

    def openai(self, key: str, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(api_key=key, base_url=f"{self.base_url}/v1", max_retries=0, **kwargs)

    def new_tenant(self, name: str | None = None) -> tuple[str, str]:
        """A new tenant and a user key for it: (tenant id, key secret)."""
        with self.http(self.admin_key) as client:
            tenant = client.post("/admin/tenants", json={"name": name or secrets.token_hex(4)})
            tenant_id = tenant.json()["id"]
            key = client.post(f"/admin/tenants/{tenant_id}/keys", json={"name": "test"})
        return tenant_id, key.json()["key"]

    def ledger_rows(self, **where: Any) -> list[dict[str, Any]]:
        """Usage rows matching `where`, once the background writer has written them."""
        assert self.services.ledger.flush(10)
        with self.services.db.session() as session:
            rows = session.scalars(select(UsageRecord).filter_by(**where).order_by(UsageRecord.id))
            return [
                {c.name: getattr(r, c.name) for c in UsageRecord.__table__.columns} for r in rows
            ]

    def ledger_row(self, request_id: str) -> dict[str, Any]:
        [row] = self.ledger_rows(request_id=request_id)
        return row

    def key_id(self, secret: str) -> str:
        with self.services.db.session() as session:
            found = PlatformStore(session).key_by_secret(secret)
            assert found is not None
            return found.id


@pytest.fixture(scope="session", params=DB_KINDS)
def server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    engine_backend: EngineBackend,
    tiny_backend: EngineBackend,
) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp(f"server-{request.param}")
    url = database_url(request.param, tmp, request)
    settings = Settings(data_dir=tmp, database_url=url, default_max_tokens=16)
    admin_keys: list[str] = []
    app = create_app(
        settings, engine_backend, extra_backends=[tiny_backend], on_admin_key=admin_keys.append
    )
    with ThreadedServer(app) as running:
        base_url = f"http://127.0.0.1:{running.port}"
        yield LiveServer(base_url, app, admin_keys[0], request.param)


@pytest.fixture(scope="session")
def tenant(server: LiveServer) -> tuple[str, str]:
    """A user tenant shared by the read-only API tests: (tenant id, key)."""
    return server.new_tenant()


@pytest.fixture(scope="session")
def client(server: LiveServer, tenant: tuple[str, str]) -> openai.OpenAI:
    return server.openai(tenant[1])
