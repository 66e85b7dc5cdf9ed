"""The Character data model: spec field names, unknown keys kept, JSON-path errors, helpers."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from talkloop.characters.errors import CardFormatError, CharacterError
from talkloop.characters.model import (
    VOICE_ASSET_TYPE,
    CardAsset,
    Character,
    Lorebook,
    LorebookEntry,
    SelectiveLogic,
)


def entry_json(**overrides: Any) -> dict[str, Any]:
    entry = {
        "keys": ["castle", "keep"],
        "content": "The castle sits on a hill.",
        "extensions": {"selectiveLogic": 3, "depth": 4, "vendor": {"x": [1, 2]}},
        "enabled": True,
        "insertion_order": 100,
        "case_sensitive": False,
        "use_regex": False,
        "constant": False,
        "name": "castle",
        "priority": 10,
        "id": 7,
        "comment": "place",
        "selective": True,
        "secondary_keys": ["hill"],
        "position": "before_char",
        "vendor_field": {"kept": True},
    }
    return {**entry, **overrides}


def test_every_entry_field_is_read_and_written_back() -> None:
    raw = entry_json()
    entry = LorebookEntry.from_spec(raw)
    assert (entry.keys, entry.secondary_keys, entry.position) == (
        ["castle", "keep"],
        ["hill"],
        "before_char",
    )
    assert (entry.priority, entry.id, entry.use_regex) == (10, 7, False)
    assert entry.unknown_fields == {"vendor_field": {"kept": True}}
    assert entry.to_spec() == raw


def test_absent_optional_fields_stay_absent_and_explicit_null_stays_null() -> None:
    raw = {"keys": [], "content": "", "extensions": {}, "enabled": True, "insertion_order": 0}
    assert LorebookEntry.from_spec(raw).to_spec() == raw
    with_null = {**raw, "comment": None}
    assert LorebookEntry.from_spec(with_null).to_spec() == with_null


def test_null_in_a_required_field_reads_as_empty() -> None:
    character = Character.from_spec({"name": "A", "creator_notes": None, "tags": None})
    assert (character.creator_notes, character.tags) == ("", [])
    assert character.to_spec()["creator_notes"] == ""


def test_numbers_keep_their_json_type() -> None:
    entry = LorebookEntry.from_spec(entry_json(insertion_order=2.5, priority=3))
    assert entry.to_spec()["insertion_order"] == 2.5
    assert type(entry.to_spec()["priority"]) is int
    assert LorebookEntry.from_spec(entry_json(id="e-1")).id == "e-1"


def test_lorebook_keeps_book_level_unknown_keys() -> None:
    raw = {
        "name": "World",
        "description": "d",
        "scan_depth": 4,
        "token_budget": 512,
        "recursive_scanning": True,
        "extensions": {"st": 1},
        "entries": [entry_json()],
        "book_vendor": [1],
    }
    book = Lorebook.from_spec(raw)
    assert book.entries[0].name == "castle"
    assert book.to_spec() == raw


def test_wrong_type_names_the_json_path() -> None:
    with pytest.raises(CardFormatError) as caught:
        Character.from_spec({"name": "A", "alternate_greetings": ["a", "b", 3]}, path="data")
    assert str(caught.value) == "data.alternate_greetings[2]: expected a string, got int 3"
    assert caught.value.field == "data.alternate_greetings[2]"
    assert isinstance(caught.value, CharacterError)
    assert isinstance(caught.value, ValueError)


def test_wrong_type_deep_in_the_book_names_the_entry() -> None:
    raw = {"character_book": {"entries": [entry_json(), entry_json(id=1.5)]}}
    with pytest.raises(CardFormatError) as caught:
        Character.from_spec(raw, path="data", source="card.json")
    assert str(caught.value) == (
        "card.json, data.character_book.entries[1].id: expected a number or a string, got float 1.5"
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"creation_date": True}, "data.creation_date: expected a number, got bool True"),
        ({"tags": "x"}, "data.tags: expected a list, got str 'x'"),
        ({"extensions": []}, "data.extensions: expected an object, got list []"),
        ({"character_book": []}, "data.character_book: expected an object, got list []"),
        (
            {"creator_notes_multilingual": {"en": 3}},
            "data.creator_notes_multilingual.en: expected a string, got int 3",
        ),
        ({"assets": [{"type": 1}]}, "data.assets[0].type: expected a string, got int 1"),
        (
            {"character_book": {"entries": [{"enabled": "yes"}]}},
            "data.character_book.entries[0].enabled: expected true or false, got str 'yes'",
        ),
    ],
)
def test_wrong_types_are_refused(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(CardFormatError) as caught:
        Character.from_spec(raw, path="data")
    assert str(caught.value) == message


def test_models_are_frozen_and_changes_are_validated() -> None:
    character = Character(name="A")
    with pytest.raises(ValidationError):
        character.name = "B"  # type: ignore[misc]
    assert character.with_changes(name="B").name == "B"
    with pytest.raises(ValidationError):
        character.with_changes(tags="not a list")


def test_voice_lives_in_the_talkloop_extension_beside_other_keys() -> None:
    character = Character(name="A", extensions={"talkloop": {"avatar": "x"}, "st": {"y": 1}})
    voiced = character.with_voice({"engine": "piper", "voice": "joe", "rate": 1.1})
    assert voiced.voice == {"engine": "piper", "voice": "joe", "rate": 1.1}
    assert voiced.extensions == {
        "talkloop": {"avatar": "x", "voice": {"engine": "piper", "voice": "joe", "rate": 1.1}},
        "st": {"y": 1},
    }
    assert character.voice is None  # the original is untouched
    assert voiced.with_voice(None).extensions == character.extensions


def test_clearing_the_last_talkloop_key_removes_the_namespace() -> None:
    character = Character(name="A").with_voice({"engine": "flite"}).with_voice(None)
    assert character.extensions == {}


def test_avatar_defaults_to_the_spec_default_icon() -> None:
    icon = Character(name="A").avatar_asset
    assert icon is not None
    assert (icon.type, icon.uri, icon.name, icon.ext) == ("icon", "ccdefault:", "main", "png")
    assert Character(name="A", assets=[]).avatar_asset is None


def test_avatar_prefers_the_main_icon_and_expressions_are_by_name() -> None:
    assets = [
        CardAsset(type="icon", uri="embeded://a.png", name="alt", ext="png"),
        CardAsset(type="icon", uri="embeded://b.png", name="main", ext="png"),
        CardAsset(type="emotion", uri="embeded://happy.png", name="happy", ext="png"),
        CardAsset(type="emotion", uri="embeded://sad.webp", name="sad", ext="webp"),
        CardAsset(type=VOICE_ASSET_TYPE, uri="embeded://v.wav", name="sample", ext="wav"),
    ]
    character = Character(name="A", assets=assets)
    assert character.avatar_asset == assets[1]
    assert character.expression_assets == {"happy": assets[2], "sad": assets[3]}
    assert character.voice_assets == [assets[4]]


def test_with_asset_replaces_the_same_type_and_name() -> None:
    character = Character(name="A")
    icon = CardAsset(type="icon", uri="embeded://main.png", name="main", ext="png")
    happy = CardAsset(type="emotion", uri="embeded://h.png", name="happy", ext="png")
    updated = character.with_asset(icon).with_asset(happy)
    assert updated.assets == [icon, happy]


@pytest.mark.parametrize(
    ("raw", "logic"),
    [
        (None, SelectiveLogic.AND_ANY),
        (1, SelectiveLogic.NOT_ALL),
        (2, SelectiveLogic.NOT_ANY),
        (3, SelectiveLogic.AND_ALL),
        (9, SelectiveLogic.AND_ANY),
        (True, SelectiveLogic.AND_ANY),
    ],
)
def test_selective_logic_comes_from_sillytavern_extensions(
    raw: int | None, logic: SelectiveLogic
) -> None:
    extensions = {} if raw is None else {"selectiveLogic": raw}
    assert LorebookEntry(extensions=extensions).selective_logic is logic


def test_greetings_are_first_then_alternates() -> None:
    character = Character(name="A", first_mes="hi", alternate_greetings=["yo", "hey"])
    assert character.greetings == ["hi", "yo", "hey"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
unknown_keys = st.text(min_size=1, max_size=8).filter(lambda key: key not in Character.model_fields)


@settings(max_examples=40, deadline=None)
@given(
    extensions=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    unknown=st.dictionaries(unknown_keys, json_values, max_size=4),
)
def test_unknown_keys_survive_any_json(extensions: dict[str, Any], unknown: dict[str, Any]) -> None:
    raw = {**Character(name="A").to_spec(), "extensions": extensions, **unknown}
    assert Character.from_spec(raw).to_spec() == raw
