"""Backend fixtures: the bundled model, and talkloop servers on loopback that a
`RemoteBackend` talks to as its replicas (each can be stopped and started on its port)."""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import func, select

from talkloop.backends.base import ModelBackend
from talkloop.backends.engine_backend import AdmissionLimits, EngineBackend
from talkloop.engine.config import EngineConfig
from talkloop.engine.loader import build_engine
from talkloop.server import Settings, create_app
from talkloop.server.db.models import UsageRecord
from talkloop.server.services import Services

MODEL = "smollm2"
TINY_MODEL = "smollm2-one-at-a-time"  # admits one request: the overload tests use it
ADMIN_KEY = secrets.token_urlsafe(32)  # every replica imports it; the remote backend uses it


@pytest.fixture(scope="session")
def engine_backend() -> Iterator[EngineBackend]:
    backend = EngineBackend.from_config(EngineConfig(dtype="bfloat16"), MODEL)
    yield backend
    asyncio.run(backend.close())


@pytest.fixture(scope="session")
def tiny_backend(engine_backend: EngineBackend) -> Iterator[EngineBackend]:
    engine = build_engine(EngineConfig(dtype="bfloat16"), engine_backend.loaded)
    backend = EngineBackend.from_engine(
        engine_backend.loaded, engine, TINY_MODEL, AdmissionLimits(max_queued_requests=1)
    )
    yield backend
    asyncio.run(backend.close())


class ReplicaServer:
    """A talkloop app under uvicorn on a fixed loopback port, from a thread; restartable."""

    def __init__(self, settings: Settings, backends: list[ModelBackend]) -> None:
        self.settings = settings
        self.backends = backends
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.app: FastAPI | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def services(self) -> Services:
        assert self.app is not None
        services: Services = self.app.state.services
        return services

    def start(self) -> ReplicaServer:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        default = self.backends[0] if self.backends else None  # None: the app builds one
        self.app = create_app(self.settings, default, extra_backends=self.backends[1:])
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, args=([sock],), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the replica server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(30)

    def num_metered(self, endpoint: str = "chat.completions") -> int:
        """Requests this replica served and metered (its own usage ledger)."""
        services = self.services
        assert services.ledger.flush(10)
        with services.db.session() as session:
            query = select(func.count()).where(UsageRecord.endpoint == endpoint)
            return int(session.execute(query).scalar_one())


def replica_settings(tmp: Path) -> Settings:
    return Settings(
        data_dir=tmp,
        admin_key=ADMIN_KEY,
        load_bundled_characters=False,
        default_max_tokens=16,
        drain_timeout_s=1.0,
    )


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory,
    engine_backend: EngineBackend,
    tiny_backend: EngineBackend,
) -> Iterator[list[ReplicaServer]]:
    """Two talkloop servers sharing the bundled model's weights and engine."""
    servers = [
        ReplicaServer(
            replica_settings(tmp_path_factory.mktemp(f"replica-{name}")),
            [engine_backend, tiny_backend],
        ).start()
        for name in "ab"
    ]
    yield servers
    for server in servers:
        if server._thread is not None and server._thread.is_alive():
            server.stop()
