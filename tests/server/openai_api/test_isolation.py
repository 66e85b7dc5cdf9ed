"""Tenant isolation through the OpenAI-compatible routes: tenant B's key (and B's end-users)
on tenant A's characters gets 404, while A reaches them; slugs are per tenant."""

from __future__ import annotations

import openai
import pytest

from talkloop.characters.bundled import bundled_character_ids, load_bundled_character
from talkloop.server.store import PlatformStore, TenantStore
from tests.server.conftest import MODEL, LiveServer

pytestmark = pytest.mark.integration

HELLO = [{"role": "user", "content": "Hello"}]


def _default_tenant_character_id(server: LiveServer, slug: str) -> tuple[str, str]:
    with server.services.db.session() as session:
        tenant = PlatformStore(session).tenant_by_name("default")
        assert tenant is not None
        row = TenantStore(session, tenant.id).characters.resolve(slug)
        assert row is not None
        return tenant.id, row.id


def test_tenant_b_cannot_reach_tenant_a_characters(server: LiveServer) -> None:
    _, a_character = _default_tenant_character_id(server, "hush")
    _, b_secret = server.new_tenant()
    b_client = server.openai(b_secret, default_headers={"X-Talkloop-User": "b-user"})
    for model in ("character/hush", f"character/{a_character}"):
        with pytest.raises(openai.NotFoundError) as caught:
            b_client.chat.completions.create(model=model, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
        assert caught.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            b_client.completions.create(model=model, prompt="Hi", max_tokens=2)
    assert [m.id for m in b_client.models.list()] == [MODEL, "smollm2-one-at-a-time"]


def test_tenant_a_reaches_its_characters_by_slug_and_id(server: LiveServer) -> None:
    _, character_id = _default_tenant_character_id(server, "hush")
    a_client = server.openai(server.admin_key)
    for model in ("character/hush", f"character/{character_id}"):
        reply = a_client.chat.completions.create(model=model, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
        assert reply.model == model
    listed = [m.id for m in a_client.models.list()]
    assert [m for m in listed if m.startswith("character/")] == [
        f"character/{slug}" for slug in bundled_character_ids()
    ]


def test_slugs_are_per_tenant(server: LiveServer) -> None:
    _, a_character = _default_tenant_character_id(server, "hush")
    b_tenant, b_secret = server.new_tenant()
    with server.services.db.session() as session:
        b_character = TenantStore(session, b_tenant).characters.create(
            "hush", load_bundled_character("vellum")
        )
        b_character_id = b_character.id
    client = server.openai(b_secret)
    raw = client.chat.completions.with_raw_response.create(
        model="character/hush",
        messages=HELLO,
        max_tokens=2,  # type: ignore[arg-type]
    )
    row = server.ledger_row(raw.headers["x-request-id"])
    assert row["character_id"] == b_character_id != a_character


def test_tenant_b_user_key_cannot_manage_tenant_a(server: LiveServer) -> None:
    a_tenant, _ = _default_tenant_character_id(server, "hush")
    _, b_secret = server.new_tenant()
    with server.http(b_secret) as http:
        assert http.get(f"/admin/tenants/{a_tenant}/keys").status_code == 403
        assert http.post(f"/admin/tenants/{a_tenant}/keys", json={}).status_code == 403
