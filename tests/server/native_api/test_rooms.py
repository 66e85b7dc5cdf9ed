"""Group rooms over HTTP: CRUD, joins and leaves as events, each strategy's speakers streamed
in order and persisted, presence-scoped history per speaker, and isolation (404 to everyone
but the owner)."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest

from talkloop.server.native_api import room_turns
from talkloop.server.store.native import NativeStore
from tests.server.conftest import LiveServer
from tests.server.native_api.conftest import CARD, Tenant, created, ok, sse_events

pytestmark = pytest.mark.integration

SHORT = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}


def card(name: str) -> dict[str, Any]:
    data = copy.deepcopy(CARD)
    data["data"]["name"] = name
    return data


@pytest.fixture
def cast(tenant_a: Tenant) -> dict[str, str]:
    """Three of alice's characters and a persona."""
    ids = {
        name: created(tenant_a.alice.post("/api/characters", json={"card": card(name)}))["id"]
        for name in ("Mira", "Corvo", "Tamsin")
    }
    ids["persona"] = created(tenant_a.alice.post("/api/personas", json={"name": "Ada"}))["id"]
    return ids


def new_room(client: httpx.Client, members: list[str], **extra: Any) -> dict[str, Any]:
    return created(client.post("/api/rooms", json={"character_ids": members, **extra}))


def room_messages(client: httpx.Client, room_id: str) -> list[dict[str, Any]]:
    return ok(client.get(f"/api/rooms/{room_id}/messages?limit=100"))["data"]


def speakers_of(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [data["character_id"] for name, data in events if name == "speaker"]


def test_create_get_list_delete(tenant_a: Tenant, cast: dict[str, str]) -> None:
    alice = tenant_a.alice
    body = {"strategy": "natural", "persona_id": cast["persona"], "title": "Harbour", "seed": 7}
    room = new_room(alice, [cast["Mira"], cast["Corvo"]], **body)
    assert (room["object"], room["title"], room["strategy"]) == ("room", "Harbour", "natural")
    assert room["persona_id"] == cast["persona"]
    assert room["members"] == [
        {"character_id": cast["Mira"], "name": "Mira"},
        {"character_id": cast["Corvo"], "name": "Corvo"},
    ]
    assert ok(alice.get(f"/api/rooms/{room['id']}")) == room
    other = new_room(alice, [cast["Tamsin"]])
    first = ok(alice.get("/api/rooms?limit=1"))
    rest = ok(alice.get(f"/api/rooms?limit=100&after={first['last_id']}"))
    listed = [row["id"] for row in first["data"] + rest["data"]]
    assert listed.index(room["id"]) < listed.index(other["id"]) and first["has_more"] is True
    assert ok(alice.delete(f"/api/rooms/{room['id']}")) == {
        "id": room["id"],
        "object": "room",
        "deleted": True,
    }
    assert alice.get(f"/api/rooms/{room['id']}").status_code == 404
    assert alice.get(f"/api/conversations/{room['conversation_id']}").status_code == 404


def test_bad_rooms_are_refused_and_nothing_is_stored(tenant_a: Tenant, cast: dict) -> None:
    alice = tenant_a.alice
    before = ok(alice.get("/api/rooms?limit=100"))["data"]
    twice = alice.post("/api/rooms", json={"character_ids": [cast["Mira"], cast["Mira"]]})
    assert twice.status_code == 400 and twice.json()["error"]["param"] == "character_ids"
    bad = alice.post("/api/rooms", json={"character_ids": [], "strategy": "loudest"})
    assert bad.status_code == 400
    unknown = alice.post("/api/rooms", json={"character_ids": ["chr_nope"]})
    assert unknown.status_code == 404
    assert ok(alice.get("/api/rooms?limit=100"))["data"] == before


def test_round_robin_turns_stream_in_order_and_persist(
    tenant_a: Tenant, cast: dict[str, str]
) -> None:
    alice = tenant_a.alice
    room = new_room(alice, [cast["Mira"], cast["Corvo"]], persona_id=cast["persona"])
    url = f"/api/rooms/{room['id']}/messages"
    events = sse_events(alice.post(url, json={"content": "Hello both", **SHORT}))
    names = [name for name, _ in events]
    assert names[:3] == ["message", "speaker", "message"] and names[-1] == "done"
    assert set(names[3:-1]) <= {"delta"}
    user, speaker, started = events[0][1], events[1][1], events[2][1]
    assert (user["role"], user["content"], user["name"]) == ("user", "Hello both", "Ada")
    assert speaker == {"character_id": cast["Mira"], "name": "Mira", "message_id": started["id"]}
    assert (started["status"], started["content"]) == ("streaming", "")
    text = "".join(data["content"] for name, data in events if name == "delta")
    done = events[-1][1]
    assert done["message"]["content"] == text and done["message"]["status"] == "complete"
    assert done["usage"]["completion_tokens"] == 2
    second = sse_events(alice.post(f"/api/rooms/{room['id']}/next", json=SHORT))
    third = sse_events(alice.post(f"/api/rooms/{room['id']}/next", json=SHORT))
    assert speakers_of(second) == [cast["Corvo"]] and speakers_of(third) == [cast["Mira"]]
    stored = room_messages(alice, room["id"])
    assert [(m["role"], m["character_id"], m["status"]) for m in stored] == [
        ("user", None, "complete"),
        ("assistant", cast["Mira"], "complete"),
        ("assistant", cast["Corvo"], "complete"),
        ("assistant", cast["Mira"], "complete"),
    ]
    assert stored[1]["content"] == text and stored[2]["name"] == "Corvo"


def visible(server: LiveServer, tenant: Tenant, room_id: str, character_id: str) -> list[str]:
    """The history the speaker's prompt is assembled from, read back from the database."""
    with server.services.db.session() as session:
        store = NativeStore(session, tenant.id)
        room = room_turns.replay(store, store.rooms.get(room_id, None))
        return [message.content for message in room_turns.history_for(room, character_id)]


def test_presence_decides_what_each_speaker_sees(
    server: LiveServer, tenant_a: Tenant, cast: dict[str, str]
) -> None:
    alice = tenant_a.alice
    room = new_room(alice, [cast["Mira"], cast["Corvo"]], strategy="manual")
    url = f"/api/rooms/{room['id']}"
    say = {"stream": False, **SHORT}
    ok(alice.post(f"{url}/messages", json={"content": "one", **say}))  # manual: nobody replies
    left = ok(alice.delete(f"{url}/members/{cast['Corvo']}"))
    assert [m["character_id"] for m in left["members"]] == [cast["Mira"]]
    ok(alice.post(f"{url}/messages", json={"content": "two", **say}))
    joined = ok(alice.post(f"{url}/members", json={"character_id": cast["Tamsin"]}))
    assert [m["name"] for m in joined["members"]] == ["Mira", "Tamsin"]
    ok(alice.post(f"{url}/members", json={"character_id": cast["Corvo"]}))
    pick = {"content": "three", "character_id": cast["Mira"], **say}
    turn = ok(alice.post(f"{url}/messages", json=pick))
    said = turn["replies"][0]["message"]["content"]
    assert said and [m["content"] for m in turn["messages"]] == ["three"]
    assert turn["replies"][0]["speaker"]["character_id"] == cast["Mira"]
    assert visible(server, tenant_a, room["id"], cast["Mira"]) == ["one", "two", "three", said]
    others = ["three", f"Mira: {said}"]
    assert visible(server, tenant_a, room["id"], cast["Corvo"]) == ["one", *others]
    assert visible(server, tenant_a, room["id"], cast["Tamsin"]) == others
    again = alice.post(f"{url}/members", json={"character_id": cast["Tamsin"]})
    assert again.status_code == 409
    gone = alice.delete(f"{url}/members/{cast['Corvo']}")
    assert gone.status_code == 200
    assert alice.delete(f"{url}/members/{cast['Corvo']}").status_code == 404


def test_manual_rooms_speak_only_when_named(tenant_a: Tenant, cast: dict[str, str]) -> None:
    alice = tenant_a.alice
    room = new_room(alice, [cast["Mira"], cast["Corvo"]], strategy="manual")
    url = f"/api/rooms/{room['id']}"
    refused = alice.post(f"{url}/next", json=SHORT)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "character_id"
    absent = alice.post(f"{url}/next", json={"character_id": cast["Tamsin"], **SHORT})
    assert absent.status_code == 400
    events = sse_events(alice.post(f"{url}/next", json={"character_id": cast["Corvo"], **SHORT}))
    assert speakers_of(events) == [cast["Corvo"]]
    assert [m["character_id"] for m in room_messages(alice, room["id"])] == [cast["Corvo"]]


def test_natural_order_lets_the_mentioned_character_speak_first(
    tenant_a: Tenant, cast: dict[str, str]
) -> None:
    alice = tenant_a.alice
    members = [cast["Mira"], cast["Corvo"], cast["Tamsin"]]
    room = new_room(alice, members, strategy="natural", seed=3)
    body = {"content": "Tamsin, what do you think?", **SHORT}
    events = sse_events(alice.post(f"/api/rooms/{room['id']}/messages", json=body))
    spoken = speakers_of(events)
    assert spoken[0] == cast["Tamsin"] and set(spoken) <= set(members)
    assert len(spoken) == len(set(spoken)) == [n for n, _ in events].count("done")


def test_director_picks_a_present_character_through_the_model(
    server: LiveServer, tenant_a: Tenant, cast: dict[str, str]
) -> None:
    alice = tenant_a.alice
    room = new_room(alice, [cast["Mira"], cast["Corvo"]], strategy="director")
    response = alice.post(f"/api/rooms/{room['id']}/next", json={"stream": False, **SHORT})
    turn = ok(response)
    [reply] = turn["replies"]
    assert reply["speaker"]["character_id"] in {cast["Mira"], cast["Corvo"]}
    request_id = response.headers["x-request-id"]
    director = server.ledger_row(f"{request_id}-director")
    assert (director["endpoint"], director["status"]) == ("native.rooms.director", "ok")
    assert 1 <= director["completion_tokens"] <= room_turns.DIRECTOR_MAX_TOKENS


def test_matching_candidate_validates_the_directors_answer() -> None:
    candidates = ["Mira", "Corvo (chr_1)"]
    assert room_turns.matching_candidate(" mira.\nand more", candidates) == "Mira"
    assert room_turns.matching_candidate("corvo (CHR_1)", candidates) == "Corvo (chr_1)"
    assert room_turns.matching_candidate("Nobody", candidates) == "Nobody"


# ---------------------------------------------------------------- isolation


def room_requests(room_id: str, character_id: str) -> list[tuple[str, str, Any]]:
    url = f"/api/rooms/{room_id}"
    return [
        ("GET", url, None),
        ("GET", f"{url}/messages", None),
        ("POST", f"{url}/messages", {"content": "hi", "stream": False, **SHORT}),
        ("POST", f"{url}/next", {"character_id": character_id, "stream": False, **SHORT}),
        ("POST", f"{url}/members", {"character_id": character_id}),
        ("DELETE", f"{url}/members/{character_id}", None),
        ("DELETE", url, None),
    ]


def test_every_room_route_is_404_to_everyone_else(
    tenant_a: Tenant, tenant_b: Tenant, cast: dict[str, str]
) -> None:
    room = new_room(tenant_a.alice, [cast["Mira"]])
    shared = created(tenant_a.whole.post("/api/characters", json={"card": card("Pell")}))["id"]
    intruders = {"tenant B": tenant_b.whole, "tenant B alice": tenant_b.alice}
    intruders["A's bob"] = tenant_a.bob
    failures = []
    for who, client in intruders.items():
        for method, url, body in room_requests(room["id"], shared):
            response = client.request(method, url, json=body)
            if response.status_code != 404 or response.json()["error"]["code"] != "not_found":
                failures.append((who, method, url, response.status_code))
        listed = [row["id"] for row in ok(client.get("/api/rooms?limit=100"))["data"]]
        assert room["id"] not in listed
    assert failures == []
    bobs = new_room(tenant_a.bob, [shared])
    stolen = tenant_a.bob.post(
        f"/api/rooms/{bobs['id']}/members", json={"character_id": cast["Corvo"]}
    )
    assert stolen.status_code == 404  # alice's private character
    assert ok(tenant_a.alice.get(f"/api/rooms/{room['id']}"))["members"] == room["members"]
    assert room_messages(tenant_a.alice, room["id"]) == []
