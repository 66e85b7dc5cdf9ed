"""Isolation matrix: tenant B (with or without an end-user, even one also named "alice")
and tenant A's other end-user get 404 on every resource alice of tenant A owns."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.server.native_api.conftest import CARD, Tenant, created, ok

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def owned(tenant_a: Tenant) -> dict[str, Any]:
    alice = tenant_a.alice
    character = created(alice.post("/api/characters", json={"card": CARD}))["id"]
    book_json = {"spec": "lorebook_v3", "data": {"entries": []}}
    book = created(alice.post("/api/world_books", json={"book": book_json}))["id"]
    persona = created(alice.post("/api/personas", json={"name": "Ada"}))["id"]
    body = {"character_id": character, "persona_id": persona}
    conversation = created(alice.post("/api/conversations", json=body))["id"]
    [message] = ok(alice.get(f"/api/conversations/{conversation}/messages"))["data"]
    url = f"/api/conversations/{conversation}/messages/{message['id']}/feedback"
    feedback = created(alice.post(url, json={"stars": 4, "thumbs": "up", "tags": ["warm"]}))["id"]
    return {
        "character": character,
        "book": book,
        "persona": persona,
        "conversation": conversation,
        "message": message["id"],
        "feedback": feedback,
    }


def requests(ids: dict[str, Any]) -> list[tuple[str, str, dict[str, Any] | None]]:
    conv = f"/api/conversations/{ids['conversation']}"
    msg = f"{conv}/messages/{ids['message']}"
    return [
        ("GET", f"/api/characters/{ids['character']}", None),
        ("PUT", f"/api/characters/{ids['character']}", {"card": CARD}),
        ("GET", f"/api/characters/{ids['character']}/export?format=json", None),
        ("GET", f"/api/characters/{ids['character']}/avatar", None),
        ("DELETE", f"/api/characters/{ids['character']}", None),
        ("GET", f"/api/world_books/{ids['book']}", None),
        ("PATCH", f"/api/world_books/{ids['book']}", {"name": "x"}),
        ("DELETE", f"/api/world_books/{ids['book']}", None),
        ("GET", f"/api/personas/{ids['persona']}", None),
        ("PATCH", f"/api/personas/{ids['persona']}", {"name": "x"}),
        ("DELETE", f"/api/personas/{ids['persona']}", None),
        ("GET", conv, None),
        ("PATCH", conv, {"title": "x"}),
        ("GET", f"{conv}/messages", None),
        ("POST", f"{conv}/messages", {"content": "hi", "max_tokens": 1, "stream": False}),
        ("GET", msg, None),
        ("PATCH", msg, {"content": "x"}),
        ("POST", f"{msg}/swipe", {"swipe_index": 1}),
        ("POST", f"{msg}/feedback", {"stars": 1}),
        ("DELETE", msg, None),
        ("DELETE", conv, None),
        ("GET", f"/api/feedback/{ids['feedback']}", None),
        ("DELETE", f"/api/feedback/{ids['feedback']}", None),
        ("POST", "/api/conversations", {"character_id": ids["character"]}),
    ]


def intruders(tenant_a: Tenant, tenant_b: Tenant) -> dict[str, httpx.Client]:
    return {"tenant B": tenant_b.whole, "tenant B alice": tenant_b.alice, "A's bob": tenant_a.bob}


def test_every_resource_is_404_to_everyone_else(
    tenant_a: Tenant, tenant_b: Tenant, owned: dict[str, Any]
) -> None:
    failures = []
    for who, client in intruders(tenant_a, tenant_b).items():
        for method, url, body in requests(owned):
            response = client.request(method, url, json=body)
            if response.status_code != 404 or response.json()["error"]["code"] != "not_found":
                failures.append((who, method, url, response.status_code))
    assert failures == []
    for kind in ("character", "persona", "conversation", "feedback"):  # all still there
        path = {"character": "characters", "persona": "personas"}.get(kind, kind + "s")
        if kind == "feedback":
            path = "feedback"
        assert tenant_a.alice.get(f"/api/{path}/{owned[kind]}").status_code == 200


def test_lists_hold_only_the_callers_rows(
    tenant_a: Tenant, tenant_b: Tenant, owned: dict[str, Any]
) -> None:
    for client in intruders(tenant_a, tenant_b).values():
        for path in ("characters", "world_books", "personas", "conversations", "feedback"):
            ids = [row["id"] for row in ok(client.get(f"/api/{path}?limit=100"))["data"]]
            assert set(ids).isdisjoint(owned.values()), path
        export = client.get("/api/feedback/export")
        assert owned["feedback"] not in export.text
    whole_export = tenant_a.whole.get("/api/feedback/export").text.splitlines()
    assert owned["feedback"] in whole_export[-1] or any(
        owned["feedback"] in x for x in whole_export
    )


def test_openai_route_does_not_reach_another_owners_character(
    tenant_a: Tenant, tenant_b: Tenant, owned: dict[str, Any]
) -> None:
    body = {
        "model": f"character/{owned['character']}",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
    }
    for client in intruders(tenant_a, tenant_b).values():
        for headers in ({}, {"X-Talkloop-Conversation": "new"}):
            response = client.post("/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "model_not_found"
    assert tenant_a.alice.post("/v1/chat/completions", json=body).status_code == 200
    slug = tenant_a.alice.get(f"/api/characters/{owned['character']}").json()["slug"]
    for client in intruders(tenant_a, tenant_b).values():
        listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert f"character/{slug}" not in listed
    listed = [m["id"] for m in tenant_a.alice.get("/v1/models").json()["data"]]
    assert f"character/{slug}" in listed
    legacy = {"model": body["model"], "prompt": "hi", "max_tokens": 1}
    for client in intruders(tenant_a, tenant_b).values():
        response = client.post("/v1/completions", json=legacy)
        assert response.status_code == 404, response.text
    assert tenant_a.alice.post("/v1/completions", json=legacy).status_code == 200
