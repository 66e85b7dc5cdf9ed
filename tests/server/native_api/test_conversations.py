"""Conversations and messages: greeting swipes, send (SSE and JSON), swipe, regenerate,
edit, branch, delete, and persistence read back from the database."""

from __future__ import annotations

import pytest

from talkloop.server.db.models import Message
from tests.server.conftest import LiveServer
from tests.server.native_api.conftest import CARD, Tenant, created, ok, sse_events

pytestmark = pytest.mark.integration

SHORT = {"max_tokens": 4, "temperature": 0}


@pytest.fixture
def chat(tenant_a: Tenant) -> dict[str, str]:
    character = created(tenant_a.alice.post("/api/characters", json={"card": CARD}))
    persona = created(tenant_a.alice.post("/api/personas", json={"name": "Ada"}))
    body = {"character_id": character["id"], "persona_id": persona["id"]}
    conversation = created(tenant_a.alice.post("/api/conversations", json=body))
    return {"character": character["id"], "persona": persona["id"], "id": conversation["id"]}


def messages(tenant: Tenant, conversation_id: str, branch: str = "all") -> list[dict]:
    url = f"/api/conversations/{conversation_id}/messages?branch={branch}&limit=100"
    return ok(tenant.alice.get(url))["data"]


def test_conversation_opens_with_greetings_as_swipes(tenant_a: Tenant, chat: dict) -> None:
    conversation = ok(tenant_a.alice.get(f"/api/conversations/{chat['id']}"))
    [greeting] = messages(tenant_a, chat["id"])
    assert conversation["active_leaf_id"] == greeting["id"]
    assert conversation["persona_id"] == chat["persona"]
    assert conversation["title"] == "Mira"
    assert greeting["role"] == "assistant" and greeting["name"] == "Mira"
    assert greeting["swipes"] == ["Hello, traveller.", "Fog again.", "You came back."]
    assert greeting["swipe_index"] == 0 and greeting["content"] == "Hello, traveller."
    assert greeting["status"] == "complete"


def test_send_streams_events_in_order_and_persists(
    server: LiveServer, tenant_a: Tenant, chat: dict
) -> None:
    url = f"/api/conversations/{chat['id']}/messages"
    response = tenant_a.alice.post(url, json={"content": "Who are you?", **SHORT})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    names = [name for name, _ in events]
    assert names[:2] == ["message", "message"] and names[-1] == "done"
    assert set(names[2:-1]) <= {"delta"} and len(names) > 3
    user, started = events[0][1], events[1][1]
    assert (user["role"], user["content"], user["name"]) == ("user", "Who are you?", "Ada")
    assert (started["role"], started["status"], started["content"]) == (
        "assistant",
        "streaming",
        "",
    )
    text = "".join(data["content"] for name, data in events if name == "delta")
    done = events[-1][1]
    assert done["message"]["id"] == started["id"]
    assert done["message"]["content"] == text and done["message"]["status"] == "complete"
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 4
    with server.services.db.session() as session:
        row = session.get(Message, started["id"])
        assert row is not None and (row.content, row.status, row.parent_id) == (
            text,
            "complete",
            user["id"],
        )


def test_swipe_regenerate_edit_branch_delete(tenant_a: Tenant, chat: dict) -> None:
    base = f"/api/conversations/{chat['id']}"
    [greeting] = messages(tenant_a, chat["id"])
    swiped = ok(
        tenant_a.alice.post(f"{base}/messages/{greeting['id']}/swipe", json={"swipe_index": 2})
    )
    assert (swiped["swipe_index"], swiped["content"]) == (2, "You came back.")
    bad = tenant_a.alice.post(f"{base}/messages/{greeting['id']}/swipe", json={"swipe_index": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "swipe_index"

    sent = ok(
        tenant_a.alice.post(f"{base}/messages", json={"content": "Hi", "stream": False, **SHORT})
    )
    reply = sent["message"]
    regen = ok(
        tenant_a.alice.post(
            f"{base}/messages/{reply['id']}/regenerate", json={"stream": False, **SHORT}
        )
    )
    assert regen["message"]["id"] == reply["id"]
    assert regen["message"]["swipes"][0] == reply["content"]
    assert len(regen["message"]["swipes"]) == 2 and regen["message"]["swipe_index"] == 1

    edited = ok(tenant_a.alice.patch(f"{base}/messages/{reply['id']}", json={"content": "Edited."}))
    assert edited["content"] == "Edited." and edited["swipes"][1] == "Edited."
    events = ok(tenant_a.alice.get(f"/api/feedback?message_id={reply['id']}"))["data"]
    [edit] = [e for e in events if e["kind"] == "edit"]
    assert edit["original_text"] == regen["message"]["content"]
    assert (edit["edited_text"], edit["editor"]) == ("Edited.", "alice")
    swipes = ok(tenant_a.alice.get(f"/api/feedback?message_id={greeting['id']}"))["data"]
    assert [(e["kind"], e["previous_swipe_index"], e["swipe_index"]) for e in swipes] == [
        ("swipe", 0, 2)
    ]

    branch = created(
        tenant_a.alice.post(f"{base}/branch", json={"parent_id": greeting["id"], "content": "Alt"})
    )
    assert branch["parent_id"] == greeting["id"] and branch["name"] == "Ada"
    active = [m["id"] for m in messages(tenant_a, chat["id"], "active")]
    assert active == [greeting["id"], branch["id"]]
    assert len(messages(tenant_a, chat["id"])) == 4

    deleted = ok(tenant_a.alice.delete(f"{base}/messages/{sent['messages'][0]['id']}"))
    assert deleted == {"id": sent["messages"][0]["id"], "object": "message", "deleted": True}
    assert [m["id"] for m in messages(tenant_a, chat["id"])] == [greeting["id"], branch["id"]]
