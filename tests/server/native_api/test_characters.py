"""Characters: CRUD, import of PNG/JSON/CHARX card files, export round trips, avatar,
bad card files (each 400, nothing stored), pagination; world books and personas CRUD."""

from __future__ import annotations

import copy
import json
import struct
import zipfile
import zlib
from io import BytesIO

import pytest

from talkloop.characters.cards import read_card, save_card
from talkloop.characters.model import Character
from tests.server.native_api.conftest import CARD, Tenant, created, ok

pytestmark = pytest.mark.integration


def _png_1px() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00\xff")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


PNG_1PX = _png_1px()


def card_model() -> Character:
    return read_card(json.dumps(CARD).encode()).character


def count(tenant: Tenant) -> int:
    return len(ok(tenant.alice.get("/api/characters?limit=100"))["data"])


def test_create_get_update_delete(tenant_a: Tenant) -> None:
    body = created(tenant_a.alice.post("/api/characters", json={"card": CARD, "slug": "mira-1"}))
    assert (body["object"], body["slug"], body["name"]) == ("character", "mira-1", "Mira")
    assert body["card"]["extensions"] == {"x_custom": {"kept": True}}
    assert ok(tenant_a.alice.get(f"/api/characters/{body['id']}")) == body
    changed = copy.deepcopy(CARD)
    changed["data"]["name"] = "Mira II"
    updated = ok(tenant_a.alice.put(f"/api/characters/{body['id']}", json={"card": changed}))
    assert updated["name"] == "Mira II" and updated["card"]["name"] == "Mira II"
    gone = ok(tenant_a.alice.delete(f"/api/characters/{body['id']}"))
    assert gone == {"id": body["id"], "object": "character", "deleted": True}
    assert tenant_a.alice.get(f"/api/characters/{body['id']}").status_code == 404


@pytest.mark.parametrize("fmt", ["png", "json", "charx"])
def test_import_then_export_round_trips(tenant_a: Tenant, fmt: str) -> None:
    raw = save_card(card_model(), fmt, 3, image=PNG_1PX if fmt != "json" else None)
    files = {"file": (f"mira.{fmt}", raw, "application/octet-stream")}
    body = created(tenant_a.alice.post("/api/characters/import", files=files))
    stored = {k: v for k, v in body["card"].items() if k != "assets"}  # CHARX adds its icon
    assert stored == card_model().to_spec()
    for out_fmt, version in [("json", 3), ("png", 2), ("charx", 3)]:
        url = f"/api/characters/{body['id']}/export?format={out_fmt}&version={version}"
        exported = tenant_a.alice.get(url)
        assert exported.status_code == 200, exported.text
        card_file = read_card(exported.content)
        assert card_file.character.name == "Mira" and card_file.version == version
        assert card_file.character.alternate_greetings == ["Fog again.", "You came back."]
    avatar = tenant_a.alice.get(f"/api/characters/{body['id']}/avatar")
    if fmt == "json":
        assert avatar.status_code == 404
    else:
        assert avatar.status_code == 200 and avatar.headers["content-type"] == "image/png"
        assert (
            avatar.content.startswith(b"\x89PNG")
            and read_card(
                tenant_a.alice.get(f"/api/characters/{body['id']}/export?format=png").content
            ).image
            == avatar.content
        )


def test_raw_body_import_and_avatar_upload(tenant_a: Tenant) -> None:
    raw = json.dumps(CARD).encode()
    body = created(tenant_a.alice.post("/api/characters/import", content=raw))
    put = tenant_a.alice.put(f"/api/characters/{body['id']}/avatar", content=PNG_1PX)
    assert put.status_code == 204
    assert tenant_a.alice.get(f"/api/characters/{body['id']}/avatar").content == PNG_1PX
    bad = tenant_a.alice.put(f"/api/characters/{body['id']}/avatar", content=b"GIF89a")
    assert bad.status_code == 400


def _zip(members: dict[str, bytes]) -> bytes:
    out = BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


BAD_FILES = {
    "not a card": (b"hello world", "not a character card"),
    "truncated png": (save_card(card_model(), "png", 3, image=PNG_1PX)[:60], "png"),
    "png without card": (PNG_1PX, "chara"),
    "zip without card.json": (_zip({"readme.txt": b"hi"}), "card.json"),
    "bad json": (b'{"spec": "chara_card_v3", "data": ', "json"),
    "wrong field type": (
        json.dumps({"spec": "chara_card_v3", "spec_version": "3.0", "data": {"name": 5}}).encode(),
        "data.name",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_card_files_are_refused_and_nothing_is_stored(tenant_a: Tenant, case: str) -> None:
    raw, mentions = BAD_FILES[case]
    before = count(tenant_a)
    response = tenant_a.alice.post("/api/characters/import", files={"file": ("card", raw)})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_card" and error["type"] == "invalid_request_error"
    assert mentions.lower() in error["message"].lower()
    assert count(tenant_a) == before


def test_pagination_walks_every_row_once(tenant_b: Tenant) -> None:
    ids = [
        created(tenant_b.bob.post("/api/personas", json={"name": f"P{i}"}))["id"] for i in range(5)
    ]
    first = ok(tenant_b.bob.get("/api/personas?limit=2"))
    assert first["object"] == "list" and first["has_more"] is True
    seen, page = [], first
    while True:
        seen += [row["id"] for row in page["data"]]
        assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == seen[-1]
        if not page["has_more"]:
            break
        page = ok(tenant_b.bob.get(f"/api/personas?limit=2&after={page['last_id']}"))
    assert seen == ids
    assert tenant_b.bob.get("/api/personas?limit=0").status_code == 400
    assert tenant_b.bob.get("/api/personas?after=per_nope").json()["error"]["param"] == "after"


def test_world_book_crud_and_attach(tenant_a: Tenant) -> None:
    book = {
        "spec": "lorebook_v3",
        "data": {"name": "Isle", "entries": [{"keys": ["fog"], "content": "F"}]},
    }
    created_book = created(tenant_a.alice.post("/api/world_books", json={"book": book}))
    assert created_book["name"] == "Isle" and created_book["book"]["spec"] == "lorebook_v3"
    assert created_book["book"]["data"]["entries"][0]["keys"] == ["fog"]
    bad = tenant_a.alice.post("/api/world_books", json={"book": {"spec": "nope"}})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_book"
    character = created(tenant_a.alice.post("/api/characters", json={"card": CARD}))
    path = f"/api/characters/{character['id']}/world_books"
    assert tenant_a.alice.put(f"{path}/{created_book['id']}").status_code == 204
    assert tenant_a.alice.put(f"{path}/{created_book['id']}").status_code == 409
    assert [b["id"] for b in ok(tenant_a.alice.get(path))["data"]] == [created_book["id"]]
    renamed = ok(tenant_a.alice.patch(f"/api/world_books/{created_book['id']}", json={"name": "N"}))
    assert renamed["name"] == "N"
    assert tenant_a.alice.delete(f"{path}/{created_book['id']}").status_code == 204
    assert ok(tenant_a.alice.get(path))["data"] == []
    assert ok(tenant_a.alice.delete(f"/api/world_books/{created_book['id']}"))["deleted"] is True


def test_persona_crud(tenant_a: Tenant) -> None:
    persona = created(
        tenant_a.alice.post("/api/personas", json={"name": "Ada", "description": "d"})
    )
    assert (persona["name"], persona["description"], persona["object"]) == ("Ada", "d", "persona")
    patched = ok(tenant_a.alice.patch(f"/api/personas/{persona['id']}", json={"name": "Ida"}))
    assert (patched["name"], patched["description"]) == ("Ida", "d")
    assert tenant_a.alice.post("/api/personas", json={"name": "  "}).status_code == 400
    assert ok(tenant_a.alice.delete(f"/api/personas/{persona['id']}"))["deleted"] is True
