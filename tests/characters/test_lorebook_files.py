"""World book files (`lorebook_v3` JSON, SillyTavern world info on read) and the keyword
index against a naive reference."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from talkloop.characters.lorebook import (
    KeywordIndex,
    LorebookFileError,
    LoreScanner,
    PlainKey,
    load_lorebook,
    lorebook_from_json,
    lorebook_to_json,
    save_lorebook,
)
from talkloop.characters.model import Lorebook, LorebookEntry

V3_BOOK = {
    "spec": "lorebook_v3",
    "data": {
        "name": "Atlas",
        "scan_depth": 4,
        "extensions": {"x_tool": {"kept": True}},
        "entries": [
            {
                "keys": ["harbor"],
                "content": "@@depth 2\nThe harbor freezes in winter.",
                "extensions": {"selectiveLogic": 2},
                "enabled": True,
                "insertion_order": 10,
                "use_regex": False,
                "id": 7,
                "x_unknown": [1, 2],
            }
        ],
    },
}


def test_v3_round_trip_keeps_unknown_fields(tmp_path: Path) -> None:
    book = lorebook_from_json(V3_BOOK)
    path = tmp_path / "atlas.json"
    save_lorebook(book, path)
    assert json.loads(path.read_text(encoding="utf-8")) == V3_BOOK
    assert load_lorebook(path) == book
    assert lorebook_to_json(book) == V3_BOOK


def test_loaded_world_book_stacks_with_a_character_book(tmp_path: Path) -> None:
    path = tmp_path / "atlas.json"
    path.write_text(json.dumps(V3_BOOK), encoding="utf-8")
    character = Lorebook(entries=[LorebookEntry(id=1, keys=["harbor"], content="char lore")])
    lore = LoreScanner(character, [load_lorebook(path)]).scan(["the harbor"], turn=0)
    assert lore.uids == ("character#1", "Atlas#7")
    assert lore.at_depth[0].content == "The harbor freezes in winter."


def test_wrong_spec_is_named() -> None:
    with pytest.raises(LorebookFileError, match="spec is 'chara_card_v2', expected 'lorebook_v3'"):
        lorebook_from_json({"spec": "chara_card_v2", "data": {}})


def test_bad_entry_field_names_its_path() -> None:
    raw = {"spec": "lorebook_v3", "data": {"entries": [{"keys": "harbor"}]}}
    with pytest.raises(LorebookFileError, match=re.escape("data.entries[0].keys")):
        lorebook_from_json(raw)


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"spec": "lorebook_v3",\n "data": }', encoding="utf-8")
    with pytest.raises(LorebookFileError, match=r"broken\.json: not valid JSON: .* line 2"):
        load_lorebook(path)


def test_not_a_world_book() -> None:
    with pytest.raises(LorebookFileError, match="not a world book"):
        lorebook_from_json({"name": "x"})
    with pytest.raises(LorebookFileError, match="got list"):
        lorebook_from_json([])


def test_failed_save_leaves_old_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "atlas.json"
    path.write_text("old", encoding="utf-8")
    bad = Lorebook.model_construct(entries=[], extensions={"x": object()}, unknown_fields={})
    with pytest.raises(TypeError):
        save_lorebook(bad, path)
    assert path.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["atlas.json"]


def test_sillytavern_world_info_is_read() -> None:
    raw = {
        "entries": {
            "0": {
                "uid": 0,
                "key": ["tower"],
                "keysecondary": ["mage"],
                "content": "The tower hums.",
                "selective": True,
                "selectiveLogic": 3,
                "order": 42,
                "position": 4,
                "depth": 1,
                "role": 2,
                "disable": False,
                "matchWholeWords": True,
                "caseSensitive": None,
            },
            "1": {"uid": 1, "key": ["moat"], "content": "Off.", "disable": True},
        }
    }
    book = lorebook_from_json(raw)
    first = book.entries[0]
    assert (first.keys, first.secondary_keys, first.insertion_order) == (["tower"], ["mage"], 42)
    assert first.extensions["match_whole_words"] is True
    assert book.entries[1].enabled is False
    lore = LoreScanner(None, [book]).scan(["the tower mage"], turn=0)
    (hit,) = lore.entries
    assert (hit.uid, hit.depth, hit.role) == ("world#0", 1, "assistant")


# --- keyword index == naive reference -----------------------------------------------------


def naive_find(keys: list[PlainKey], text: str) -> dict[PlainKey, bool]:
    found: dict[PlainKey, bool] = {}
    for key in keys:
        haystack = text if key.case_sensitive else text.lower()
        for match in re.finditer("(?=" + re.escape(key.text) + ")", haystack):
            start, end = match.start(), match.start() + len(key.text)
            before = start == 0 or not (haystack[start - 1].isalnum() or haystack[start - 1] == "_")
            after = end == len(haystack) or not (haystack[end].isalnum() or haystack[end] == "_")
            found[key] = found.get(key, False) or (before and after)
    return found


ALPHABET = "abAB _-.+"
keys_strategy = st.lists(
    st.builds(PlainKey, st.text(ALPHABET, min_size=1, max_size=4), st.booleans()),
    max_size=12,
).map(
    lambda keys: [
        PlainKey(k.text if k.case_sensitive else k.text.lower(), k.case_sensitive) for k in keys
    ]
)


@settings(max_examples=300, deadline=None)
@given(keys=keys_strategy, text=st.text(ALPHABET, max_size=40))
def test_keyword_index_matches_naive_reference(keys: list[PlainKey], text: str) -> None:
    assert KeywordIndex(keys).find(text) == naive_find(list(dict.fromkeys(keys)), text)


def test_keyword_index_reports_overlapping_and_prefix_keys() -> None:
    keys = [PlainKey(k, False) for k in ("dragon", "dragonfly", "red dragon", "fly")]
    found = KeywordIndex(keys).find("A Red Dragonfly.")
    assert found == {keys[0]: False, keys[1]: True, keys[2]: False, keys[3]: False}
