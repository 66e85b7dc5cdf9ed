"""API keys: format and storage, and the key lifecycle against the live server (both DBs)."""

from __future__ import annotations

import hashlib

import openai
import pytest
from sqlalchemy import select

from talkloop.server.db.models import ApiKey
from talkloop.server.keys import generate_api_key, hash_api_key, key_prefix
from tests.server.conftest import MODEL, LiveServer

HELLO = [{"role": "user", "content": "Hi"}]


def test_keys_are_random_prefixed_and_carry_at_least_128_bits() -> None:
    keys = {generate_api_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith("tl-") and len(key) == 46
        assert len(key_prefix(key)) == 11 and key.startswith(key_prefix(key))
    # 43 URL-safe base64 characters = 258 bits from secrets.token_urlsafe(32)
    assert hash_api_key("tl-x") == hashlib.sha256(b"tl-x").hexdigest()


@pytest.mark.integration
def test_only_the_hash_and_prefix_are_stored(server: LiveServer) -> None:
    _, secret = server.new_tenant()
    with server.services.db.session() as session:
        row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_api_key(secret))).one()
        stored = [str(getattr(row, c.name)) for c in ApiKey.__table__.columns]
    assert row.prefix == secret[:11]
    assert all(secret not in value for value in stored)


@pytest.mark.integration
def test_key_lifecycle_create_use_revoke(server: LiveServer) -> None:
    tenant_id, secret = server.new_tenant()
    client = server.openai(secret)
    assert client.models.list().data[0].id == MODEL
    with server.http(server.admin_key) as admin:
        keys = admin.get(f"/admin/tenants/{tenant_id}/keys").json()
        assert [(k["prefix"], k["scope"], k["revoked_at"]) for k in keys] == [
            (secret[:11], "user", None)
        ]
        assert "key" not in keys[0] and "key_hash" not in keys[0]
        revoked = admin.delete(f"/admin/tenants/{tenant_id}/keys/{keys[0]['id']}")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.code == "revoked_api_key"
    assert caught.value.response.headers["x-should-retry"] == "false"


@pytest.mark.integration
def test_bad_keys_are_401_in_the_openai_envelope(server: LiveServer) -> None:
    with server.http() as http:
        missing = http.get("/v1/models")
        malformed = http.get("/v1/models", headers={"Authorization": "Basic abc"})
        wrong = http.get("/v1/models", headers={"Authorization": "Bearer tl-wrongwrongwrong"})
    assert [r.status_code for r in (missing, malformed, wrong)] == [401, 401, 401]
    assert missing.json()["error"]["code"] == "missing_api_key"
    assert wrong.json()["error"] == {
        "message": "incorrect API key provided: tl-wrongwro...",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    with pytest.raises(openai.AuthenticationError):
        server.openai("tl-nope").chat.completions.create(model=MODEL, messages=HELLO)


@pytest.mark.integration
def test_user_keys_cannot_use_admin_routes(server: LiveServer) -> None:
    tenant_id, secret = server.new_tenant()
    with server.http(secret) as http:
        for response in (
            http.get("/admin/tenants"),
            http.post("/admin/tenants", json={"name": "mine"}),
            http.post(f"/admin/tenants/{tenant_id}/keys", json={"scope": "admin"}),
        ):
            assert response.status_code == 403
            assert response.json()["error"]["code"] == "permission_denied"


@pytest.mark.integration
def test_admin_routes_report_unknown_tenants_and_duplicates(server: LiveServer) -> None:
    with server.http(server.admin_key) as admin:
        assert admin.get("/admin/tenants/ten_nope").status_code == 404
        assert admin.post("/admin/tenants/ten_nope/keys", json={}).status_code == 404
        name = f"dup-{server.db_kind}"
        assert admin.post("/admin/tenants", json={"name": name}).status_code == 201
        duplicate = admin.post("/admin/tenants", json={"name": name})
        assert duplicate.status_code == 409 and duplicate.json()["error"]["param"] == "name"
        bad = admin.post("/admin/tenants", json={"name": ""})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "name"


@pytest.mark.integration
def test_end_user_header_is_checked(server: LiveServer) -> None:
    _, secret = server.new_tenant()
    with server.http(secret, **{"X-Talkloop-User": "u" * 257}) as http:
        response = http.get("/v1/models")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "X-Talkloop-User"
