"""CHARX cards: card.json plus assets in a zip; exact round trips and asset resolution."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from talkloop.characters.cards import CardFormat, CardVersion, load_card, read_card, save_card
from talkloop.characters.cards.charx import MAIN_ICON_PATH
from talkloop.characters.errors import CardFormatError

HAPPY = "assets/emotion/images/happy.png"
VOICE = "assets/x_talkloop_voice/audio/sample.wav"


def picture(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (3, 2), color).save(out, format="PNG")
    return out.getvalue()


def v3_card() -> dict[str, Any]:
    data = {
        "name": "Zip",
        "description": "d",
        "personality": "",
        "scenario": "",
        "first_mes": "hi",
        "mes_example": "",
        "creator_notes": "",
        "system_prompt": "",
        "post_history_instructions": "",
        "alternate_greetings": [],
        "tags": [],
        "creator": "",
        "character_version": "",
        "group_only_greetings": ["all"],
        "extensions": {
            "talkloop": {"voice": {"engine": "piper", "sample": "sample"}},
            "risu": {"k": [1, {"z": None}]},
        },
        "assets": [
            {"type": "icon", "uri": f"embeded://{MAIN_ICON_PATH}", "name": "main", "ext": "png"},
            {"type": "emotion", "uri": f"embedded://{HAPPY}", "name": "happy", "ext": "png"},
            {
                "type": "x_talkloop_voice",
                "uri": f"embeded://{VOICE}",
                "name": "sample",
                "ext": "wav",
            },
            {
                "type": "background",
                "uri": "https://example.org/bg.webp",
                "name": "main",
                "ext": "webp",
            },
        ],
        "data_extra": {"kept": True},
    }
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": data, "top_extra": 1}


def archive(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def members() -> dict[str, bytes]:
    return {
        "card.json": json.dumps(v3_card()).encode(),
        MAIN_ICON_PATH: picture((255, 0, 0)),
        HAPPY: picture((0, 255, 0)),
        VOICE: b"RIFF....WAVE",
        "x_meta.json": b'{"app": "other"}',
    }


def unzip(raw: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def test_charx_round_trips_card_and_members_exactly() -> None:
    card = read_card(archive(members()))
    assert (card.format, card.version) == (CardFormat.CHARX, CardVersion.V3)
    written = unzip(save_card(card.character, "charx", 3, files=card.files))
    assert json.loads(written.pop("card.json")) == v3_card()
    original = members()
    del original["card.json"]
    assert written == original


def test_embedded_uris_resolve_to_archive_files_in_both_spellings() -> None:
    card = read_card(archive(members()))
    character = card.character
    assert character.avatar_asset is not None
    assert card.asset_bytes(character.avatar_asset) == picture((255, 0, 0))
    assert card.image == picture((255, 0, 0))
    assert card.asset_bytes(character.expression_assets["happy"]) == picture((0, 255, 0))
    assert card.asset_bytes(character.voice_assets[0]) == b"RIFF....WAVE"
    assert character.voice == {"engine": "piper", "sample": "sample"}


def test_writing_is_deterministic() -> None:
    card = read_card(archive(members()))
    first = save_card(card.character, "charx", 3, files=card.files)
    assert save_card(card.character, "charx", 3, files=card.files) == first
    assert unzip(first).keys() == {"card.json", *card.files}


def test_png_card_becomes_charx_with_its_image_as_main_icon(tmp_path: Path) -> None:
    png_card = json.loads(json.dumps(v3_card()))
    png_card["data"]["assets"] = [
        {"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}
    ]
    image = picture((0, 0, 255))
    png = save_card(load_card(json.dumps(png_card).encode()), "png", 3, image=image)
    loaded = read_card(png)
    charx = save_card(loaded.character, "charx", 3, image=loaded.image)
    path = tmp_path / "zip.charx"
    path.write_bytes(charx)
    card = read_card(path)
    assert card.files == {MAIN_ICON_PATH: loaded.image}
    icon = card.character.avatar_asset
    assert icon is not None and icon.uri == f"embeded://{MAIN_ICON_PATH}"


def test_asset_without_its_file_is_refused_on_save() -> None:
    character = load_card(json.dumps(v3_card()).encode())
    with pytest.raises(CardFormatError, match=r"files has no 'assets/emotion/images/happy.png'"):
        save_card(character, "charx", 3, files={MAIN_ICON_PATH: b"x", VOICE: b"y"})


def test_unsafe_file_names_are_refused_on_save() -> None:
    character = load_card(json.dumps(v3_card()).encode()).with_changes(assets=[])
    with pytest.raises(CardFormatError, match=r"escapes the archive"):
        save_card(character, "charx", 3, files={"../evil.txt": b"x"})
    with pytest.raises(CardFormatError, match=r"must not contain card.json"):
        save_card(character, "charx", 3, files={"card.json": b"{}"})


def test_a_v2_card_json_inside_charx_is_read() -> None:
    v2 = json.loads(save_card(load_card(json.dumps(v3_card()).encode()), "json", 2))
    files = members() | {"card.json": json.dumps(v2).encode()}
    card = read_card(archive(files))
    assert card.version is CardVersion.V2
    assert json.loads(save_card(card.character, "json", 3)) == v3_card()
