"""The app's lifespan: migrate, bootstrap once (admin key, bundled characters), health,
readiness, request ids and draining. A scripted backend keeps these fast; the live-server
tests run the same app on the real engine."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from talkloop.characters.bundled import bundled_character_ids
from talkloop.server import Settings, create_app
from talkloop.server.db.database import Database
from talkloop.server.db.models import ApiKey, Character, KeyScope, Tenant
from talkloop.server.keys import hash_api_key
from talkloop.server.middleware import RequestIdLogFilter
from tests.server.fakes import FakeBackend

STRONG_KEY = "tl-" + "Qw3rTy7uI0pAs2dF4gH6jK8lZx1cV3bN5m"


def _settings(db: Database, tmp_path: Path, **extra: object) -> Settings:
    return Settings(data_dir=tmp_path, database_url=db.url, **extra)  # type: ignore[arg-type]


def _count(db: Database, model: type, **where: object) -> int:
    with db.session() as session:
        query = select(func.count()).select_from(model).filter_by(**where)
        return session.scalar(query) or 0


@pytest.fixture
def started(db: Database, tmp_path: Path) -> Iterator[tuple[TestClient, list[str]]]:
    keys: list[str] = []
    app = create_app(_settings(db, tmp_path), FakeBackend(), on_admin_key=keys.append)
    with TestClient(app) as client:
        yield client, keys


def test_first_start_creates_tenant_admin_key_and_bundled_characters(
    db: Database, started: tuple[TestClient, list[str]]
) -> None:
    client, keys = started
    [secret] = keys
    assert secret.startswith("tl-") and len(secret) == 46
    assert _count(db, Tenant, name="default") == 1
    assert _count(db, ApiKey, scope=KeyScope.ADMIN) == 1
    assert _count(db, ApiKey, key_hash=hash_api_key(secret)) == 1
    with db.session() as session:
        slugs = sorted(session.scalars(select(Character.slug)))
    assert slugs == bundled_character_ids()
    models = client.get("/v1/models", headers={"Authorization": f"Bearer {secret}"}).json()
    assert [m["id"] for m in models["data"]] == [
        "fake",
        *(f"character/{slug}" for slug in bundled_character_ids()),
    ]


def test_a_second_start_changes_nothing(db: Database, tmp_path: Path) -> None:
    keys: list[str] = []
    for _ in range(2):
        app = create_app(_settings(db, tmp_path), FakeBackend(), on_admin_key=keys.append)
        with TestClient(app) as client:
            assert client.get("/ready").status_code == 200
    assert len(keys) == 1
    assert _count(db, ApiKey) == 1
    assert _count(db, Character) == len(bundled_character_ids())


def test_configured_admin_key_is_imported_and_no_other_is_made(
    db: Database, tmp_path: Path
) -> None:
    keys: list[str] = []
    settings = _settings(db, tmp_path, admin_key=STRONG_KEY, load_bundled_characters=False)
    with TestClient(create_app(settings, FakeBackend(), on_admin_key=keys.append)) as client:
        response = client.get("/admin/tenants", headers={"Authorization": f"Bearer {STRONG_KEY}"})
        assert response.status_code == 200
        assert [t["name"] for t in response.json()] == ["default"]
    assert keys == []
    assert _count(db, Character) == 0


def test_health_ready_and_request_ids(started: tuple[TestClient, list[str]]) -> None:
    client, _ = started
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.json() == {"status": "ready", "checks": {"database": True, "model": True}}
    ids = {client.get("/health").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 24 for i in ids)
    spoofed = client.get("/health", headers={"x-request-id": "mine"}).headers["x-request-id"]
    assert spoofed != "mine"


def test_draining_refuses_new_requests_with_503_but_stays_alive(
    started: tuple[TestClient, list[str]],
) -> None:
    client, keys = started
    client.app.state.drain_gate.start_draining()  # type: ignore[attr-defined]
    response = client.get("/v1/models", headers={"Authorization": f"Bearer {keys[0]}"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "shutting_down"
    assert response.headers["retry-after"] == "1"
    assert client.get("/ready").status_code == 503
    assert client.get("/health").status_code == 200


def test_every_request_gets_one_access_line(
    started: tuple[TestClient, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = started
    caplog.handler.addFilter(RequestIdLogFilter())
    with caplog.at_level(logging.INFO, logger="talkloop.access"):
        ok = client.get("/health", headers={"x-request-id": "mine"})
        missing = client.get("/v1/models")  # no key: 401
    lines = [r for r in caplog.records if r.name == "talkloop.access"]
    assert [(r.path, r.status) for r in lines] == [("/health", 200), ("/v1/models", 401)]
    assert lines[0].request_id == ok.headers["x-request-id"] != "mine"
    assert lines[0].client_request_id == "mine"
    assert lines[1].request_id == missing.headers["x-request-id"]
