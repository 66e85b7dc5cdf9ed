"""JSON cards: spec conformance per version, exact round trips, and the downgrade rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from talkloop.characters.cards import (
    CardFormat,
    CardVersion,
    load_card,
    read_card,
    save_card,
)
from talkloop.characters.errors import CardFormatError

V2_DATA_KEYS = {
    "name",
    "description",
    "personality",
    "scenario",
    "first_mes",
    "mes_example",
    "creator_notes",
    "system_prompt",
    "post_history_instructions",
    "alternate_greetings",
    "tags",
    "creator",
    "character_version",
    "extensions",
}
V3_ONLY_KEYS = {
    "assets",
    "nickname",
    "creator_notes_multilingual",
    "source",
    "group_only_greetings",
    "creation_date",
    "modification_date",
}


def v1_card() -> dict[str, Any]:
    return {
        "name": "Aria",
        "description": "A lighthouse keeper.",
        "personality": "calm",
        "scenario": "A storm.",
        "first_mes": "Welcome, {{user}}.",
        "mes_example": "<START>\n{{char}}: Hello.",
        "avatar": "none",
        "create_date": "2023-5-1 @12h",
        "talkativeness": "0.5",
    }


def lorebook(*, v3: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "keys": ["lamp"],
        "content": "The lamp never goes out.",
        "extensions": {"selectiveLogic": 0, "probability": 100, "vendor": {"deep": [1]}},
        "enabled": True,
        "insertion_order": 100,
        "case_sensitive": False,
        "constant": False,
        "name": "lamp",
        "priority": 5,
        "id": 0,
        "comment": "",
        "selective": True,
        "secondary_keys": ["light"],
        "position": "after_char",
        "entry_vendor_key": "kept",
    }
    if v3:
        entry["use_regex"] = True
    return {
        "name": "Lighthouse",
        "description": "",
        "scan_depth": 3,
        "token_budget": 400,
        "recursive_scanning": False,
        "extensions": {"book_vendor": True},
        "entries": [entry],
    }


def v2_card() -> dict[str, Any]:
    return {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {
            **{key: v1_card()[key] for key in ("name", "description", "personality")},
            **{key: v1_card()[key] for key in ("scenario", "first_mes", "mes_example")},
            "creator_notes": "Be kind.",
            "system_prompt": "{{original}} Stay in character.",
            "post_history_instructions": "",
            "alternate_greetings": ["Another storm?", "Ah, it's you."],
            "character_book": lorebook(v3=False),
            "tags": ["sea", "calm"],
            "creator": "me",
            "character_version": "1.2",
            "extensions": {"talkativeness": "0.5", "fav": False, "depth_prompt": {"depth": 4}},
            "data_vendor_key": {"kept": [1, 2]},
        },
        "top_vendor_key": "kept too",
    }


def v3_card() -> dict[str, Any]:
    data = {
        **v2_card()["data"],
        "character_book": lorebook(v3=True),
        "assets": [
            {"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"},
            {
                "type": "emotion",
                "uri": "embeded://assets/emotion/images/happy.png",
                "name": "happy",
                "ext": "png",
                "asset_vendor": 1,
            },
        ],
        "nickname": "Ari",
        "creator_notes_multilingual": {"en": "Be kind.", "ja": "優しく。"},
        "source": ["https://example.org/aria"],
        "group_only_greetings": ["Hello, everyone."],
        "creation_date": 1700000000,
        "modification_date": 1700000500,
    }
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": data, "top": {"k": 1}}


def roundtrip(card: dict[str, Any], version: CardVersion) -> dict[str, Any]:
    character = load_card(json.dumps(card).encode())
    result: dict[str, Any] = json.loads(save_card(character, CardFormat.JSON, version))
    return result


@pytest.mark.parametrize(
    ("card", "version"),
    [(v1_card(), CardVersion.V1), (v2_card(), CardVersion.V2), (v3_card(), CardVersion.V3)],
)
def test_each_version_round_trips_exactly(card: dict[str, Any], version: CardVersion) -> None:
    assert read_card(json.dumps(card).encode()).version is version
    assert roundtrip(card, version) == card


def test_v1_fields_and_top_level_keys() -> None:
    character = load_card(json.dumps(v1_card()).encode())
    assert (character.name, character.first_mes) == ("Aria", "Welcome, {{user}}.")
    assert character.card_fields == {
        "avatar": "none",
        "create_date": "2023-5-1 @12h",
        "talkativeness": "0.5",
    }


def test_v3_fields_are_read() -> None:
    character = load_card(json.dumps(v3_card()).encode())
    assert character.nickname == "Ari"
    assert character.creator_notes_multilingual == {"en": "Be kind.", "ja": "優しく。"}
    assert character.source == ["https://example.org/aria"]
    assert character.group_only_greetings == ["Hello, everyone."]
    assert (character.creation_date, character.modification_date) == (1700000000, 1700000500)
    assert character.expression_assets["happy"].unknown_fields == {"asset_vendor": 1}
    assert character.character_book is not None
    assert character.character_book.entries[0].use_regex is True


def test_v3_to_v2_keeps_v3_fields_in_the_talkloop_extension() -> None:
    v2 = roundtrip(v3_card(), CardVersion.V2)
    assert (v2["spec"], v2["spec_version"]) == ("chara_card_v2", "2.0")
    assert v2["data"].keys() >= V2_DATA_KEYS
    assert not V3_ONLY_KEYS & v2["data"].keys()
    stash = v2["data"]["extensions"]["talkloop"]["v3"]
    assert stash == {key: v3_card()["data"][key] for key in V3_ONLY_KEYS}
    assert v2["data"]["extensions"]["depth_prompt"] == {"depth": 4}


def test_v3_to_v2_to_v3_is_lossless() -> None:
    v2 = roundtrip(v3_card(), CardVersion.V2)
    assert roundtrip(v2, CardVersion.V3) == v3_card()
    assert roundtrip(v2, CardVersion.V2) == v2


def test_talkloop_keys_beside_the_stash_survive() -> None:
    card = v3_card()
    card["data"]["extensions"]["talkloop"] = {"voice": {"engine": "piper", "voice": "joe"}}
    v2 = roundtrip(card, CardVersion.V2)
    assert v2["data"]["extensions"]["talkloop"]["voice"] == {"engine": "piper", "voice": "joe"}
    back = load_card(json.dumps(v2).encode())
    assert back.voice == {"engine": "piper", "voice": "joe"}
    assert roundtrip(v2, CardVersion.V3) == card


def test_empty_group_greetings_are_not_stashed() -> None:
    card = v3_card()
    for key in V3_ONLY_KEYS - {"group_only_greetings"}:
        del card["data"][key]
    card["data"]["group_only_greetings"] = []
    v2 = roundtrip(card, CardVersion.V2)
    assert "talkloop" not in v2["data"]["extensions"]
    assert roundtrip(v2, CardVersion.V3) == card


def test_sillytavern_style_v2_with_inline_v3_fields_round_trips() -> None:
    card = v2_card()
    card["data"]["group_only_greetings"] = ["Hi all."]
    card |= {"name": "Aria", "description": "A lighthouse keeper.", "fav": False}
    character = load_card(json.dumps(card).encode())
    assert character.group_only_greetings == ["Hi all."]
    assert roundtrip(card, CardVersion.V2) == card


def test_sillytavern_top_level_mirror_follows_edits() -> None:
    card = v2_card() | {"name": "Aria", "creatorcomment": "old"}
    character = load_card(json.dumps(card).encode()).with_changes(name="Marina")
    written = json.loads(save_card(character, "json", 2))
    assert (written["name"], written["data"]["name"]) == ("Marina", "Marina")
    assert written["creatorcomment"] == "old"


def test_v1_upgrades_to_a_conformant_v3() -> None:
    v3 = roundtrip(v1_card(), CardVersion.V3)
    assert (v3["spec"], v3["spec_version"]) == ("chara_card_v3", "3.0")
    assert V2_DATA_KEYS | {"group_only_greetings"} <= v3["data"].keys()
    assert v3["data"]["group_only_greetings"] == []
    assert v3["avatar"] == "none"


def test_v2_lorebook_entries_get_use_regex_in_v3() -> None:
    v3 = roundtrip(v2_card(), CardVersion.V3)
    assert v3["data"]["character_book"]["entries"][0]["use_regex"] is False
    assert v3["data"]["character_book"]["entries"][0]["entry_vendor_key"] == "kept"


def test_v3_downgrades_to_v1_with_only_v1_fields() -> None:
    v1 = roundtrip(v3_card(), CardVersion.V1)
    assert v1 == {
        **{key: v1_card()[key] for key in ("name", "description", "personality")},
        **{key: v1_card()[key] for key in ("scenario", "first_mes", "mes_example")},
        "top": {"k": 1},
    }


def test_json_file_on_disk_and_non_ascii_text(tmp_path: Path) -> None:
    card = v3_card()
    card["data"]["description"] = "Ünïcödé 灯台 🌊"
    path = tmp_path / "aria.json"
    path.write_bytes(json.dumps(card).encode())
    written = save_card(load_card(path), "json", 3)
    assert "灯台 🌊".encode() in written
    assert json.loads(written) == card


def test_explicit_null_optional_fields_round_trip() -> None:
    card = v3_card()
    card["data"]["nickname"] = None
    card["data"]["character_book"]["entries"][0]["comment"] = None
    assert roundtrip(card, CardVersion.V3) == card
    assert roundtrip(roundtrip(card, CardVersion.V2), CardVersion.V3) == card


def test_unknown_spec_is_refused() -> None:
    card = v3_card() | {"spec": "chara_card_v9"}
    with pytest.raises(CardFormatError, match=r"spec: unknown card spec 'chara_card_v9'"):
        load_card(json.dumps(card).encode())
