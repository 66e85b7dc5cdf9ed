"""The bundled characters: all load, are complete V3 cards, and two share a world book."""

from __future__ import annotations

import json
import re
from importlib.resources.abc import Traversable

import pytest

from talkloop.characters.bundled import (
    BundledNotFoundError,
    bundled_character_ids,
    bundled_character_paths,
    bundled_world_book_ids,
    bundled_world_book_paths,
    load_bundled_character,
    load_bundled_characters,
    load_bundled_world_book,
    load_world_books_for,
    world_book_ids,
)
from talkloop.characters.cards import load_card, save_card
from talkloop.characters.errors import CardFormatError, CharacterError
from talkloop.characters.lorebook import LoreScanner
from talkloop.characters.model import Character, Lorebook
from talkloop.characters.rooms import Room

IDS = ["hush", "ines_corvo", "oriel_fenn", "poppy_adeyemi_lund", "vellum"]


@pytest.fixture(scope="module")
def characters() -> dict[str, Character]:
    return dict(zip(bundled_character_ids(), load_bundled_characters(), strict=True))


def test_five_characters_are_bundled_and_load(characters: dict[str, Character]) -> None:
    assert bundled_character_ids() == IDS
    assert [c.name for c in characters.values()] == [
        "Hush",
        "Inspector Ines Corvo",
        "Madame Oriel Fenn",
        "Poppy Adeyemi-Lund",
        "Vellum",
    ]
    assert load_bundled_character("vellum") == characters["vellum"]


@pytest.mark.parametrize("path", bundled_character_paths(), ids=lambda p: p.name)
def test_each_file_is_a_v3_card(path: Traversable) -> None:
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert (raw["spec"], raw["spec_version"]) == ("chara_card_v3", "3.0")
    assert set(raw) == {"spec", "spec_version", "data"}


@pytest.mark.parametrize("character_id", IDS)
def test_each_card_is_complete(characters: dict[str, Character], character_id: str) -> None:
    character = characters[character_id]
    for field in ("description", "personality", "scenario", "first_mes", "creator_notes"):
        assert getattr(character, field).strip(), f"{character_id}: empty {field}"
    assert len(character.alternate_greetings) >= 2
    assert character.group_only_greetings
    assert "talkloop-original" in character.tags
    assert character.mes_example.startswith("<START>\n")
    assert character.mes_example.count("<START>") >= 3
    assert "{{char}}:" in character.mes_example and "{{user}}:" in character.mes_example


@pytest.mark.parametrize("character_id", IDS)
def test_only_char_and_user_macros_are_used(
    characters: dict[str, Character], character_id: str
) -> None:
    text = json.dumps(characters[character_id].to_spec())
    assert set(re.findall(r"\{\{(.*?)\}\}", text)) <= {"char", "user"}


@pytest.mark.parametrize("character_id", IDS)
def test_each_lorebook_has_fifteen_real_entries(
    characters: dict[str, Character], character_id: str
) -> None:
    book = characters[character_id].character_book
    assert book is not None
    entries = book.entries
    assert len(entries) >= 15
    assert all(entry.keys and all(key.strip() for key in entry.keys) for entry in entries)
    assert all(len(entry.content) > 80 for entry in entries)
    assert len({entry.id for entry in entries}) == len(entries)
    assert any(entry.constant for entry in entries)
    selective = [entry for entry in entries if entry.selective]
    assert selective and all(entry.secondary_keys for entry in selective)
    assert all(not entry.constant for entry in selective)


@pytest.mark.parametrize("character_id", IDS)
def test_each_card_leaves_a_talkloop_voice_slot(
    characters: dict[str, Character], character_id: str
) -> None:
    character = characters[character_id]
    assert "voice" in character.talkloop
    assert character.voice is None  # for the voice issue to fill
    assert len(character.talkloop["voice_hint"]) > 20
    assert 0.0 <= float(character.extensions["talkativeness"]) <= 1.0


@pytest.mark.parametrize("character_id", IDS)
def test_each_card_survives_a_save_and_load(
    characters: dict[str, Character], character_id: str
) -> None:
    character = characters[character_id]
    assert load_card(save_card(character, "json")) == character
    assert load_card(save_card(character, "png")) == character


# ------------------------------------------------------------------ the shared world book


def test_the_shared_world_book_is_referenced_by_two_characters_and_loads(
    characters: dict[str, Character],
) -> None:
    assert bundled_world_book_ids() == ["saltmarrow"]
    raw = json.loads(bundled_world_book_paths()[0].read_text(encoding="utf-8"))
    assert raw["spec"] == "lorebook_v3"
    users = [cid for cid, character in characters.items() if world_book_ids(character)]
    assert users == ["ines_corvo", "oriel_fenn"]
    assert all(world_book_ids(characters[cid]) == ["saltmarrow"] for cid in users)
    world = load_bundled_world_book("saltmarrow")
    assert world.name == "Saltmarrow"
    assert len(world.entries) >= 15
    assert any(entry.constant for entry in world.entries)
    assert load_world_books_for(characters["ines_corvo"]) == [world]
    assert load_world_books_for(characters["vellum"]) == []


def test_a_group_room_shares_the_world_book_but_not_private_lore(
    characters: dict[str, Character],
) -> None:
    room = Room()
    for character_id in ("ines_corvo", "oriel_fenn", "poppy_adeyemi_lund"):
        character = characters[character_id]
        room.add_character(
            character_id, character, world_books=load_world_books_for(character), greet=True
        )
    world = load_bundled_world_book("saltmarrow")
    corvo = room.context_for("ines_corvo").lorebooks
    fenn = room.context_for("oriel_fenn").lorebooks
    poppy = room.context_for("poppy_adeyemi_lund").lorebooks
    assert world in corvo and world in fenn and world not in poppy
    assert characters["oriel_fenn"].character_book not in corvo
    assert characters["ines_corvo"].character_book not in fenn
    greeting = room.conversation.active_path()[0]
    assert greeting.swipes[-1] == characters["ines_corvo"].group_only_greetings[0]


def test_unknown_ids_name_what_is_bundled() -> None:
    with pytest.raises(BundledNotFoundError, match=r"no bundled character 'ada'; bundled: \["):
        load_bundled_character("ada")
    with pytest.raises(CharacterError, match=r"no bundled world book 'atlantis'; bundled: \["):
        load_bundled_world_book("atlantis")


def test_a_bad_world_book_list_is_reported() -> None:
    character = Character(name="Odd", extensions={"talkloop": {"world_books": "saltmarrow"}})
    with pytest.raises(CardFormatError, match=re.escape("data.extensions.talkloop.world_books")):
        world_book_ids(character)


# ------------------------------------------------------------------ the books activate sensibly


def activated(
    text: str, character: Character, world_books: list[Lorebook] | None = None
) -> set[str]:
    """Names of the entries a one-message chat activates (constant entries included)."""
    books = [character.character_book, *(world_books or [])]
    names = {entry.content: entry.name for book in books if book for entry in book.entries}
    scanner = LoreScanner(character.character_book, world_books or [])
    return {names[entry.content] or "" for entry in scanner.scan([text], turn=1).entries}


def test_the_world_book_activates_beside_the_characters_own(
    characters: dict[str, Character],
) -> None:
    corvo = characters["ines_corvo"]
    found = activated(
        "We took a punt through the fog to Gullwharf.",
        corvo,
        [load_bundled_world_book("saltmarrow")],
    )
    assert {"Saltmarrow", "Punts", "The Grey Cloth", "Gullwharf"} <= found
    assert {"How Corvo talks", "Corvo's rules"} <= found  # constant


def test_keys_match_whole_words_only(characters: dict[str, Character]) -> None:
    vellum = characters["vellum"]
    assert "Ink" not in activated("Please open the door; what happened?", vellum)
    assert "Ink" in activated("Where do you get your ink?", vellum)


def test_selective_entries_need_a_secondary_key(characters: dict[str, Character]) -> None:
    vellum, fenn = characters["vellum"], characters["oriel_fenn"]
    assert "The Locked Shelf" not in activated("There is a locked shelf up there.", vellum)
    assert "The Locked Shelf" in activated("Open the locked shelf for me.", vellum)
    assert "The truth about the readings" not in activated("Is that real silver?", fenn)
    assert "The truth about the readings" in activated("Is the fortune real?", fenn)


def test_the_sleep_coach_stops_for_a_crisis(characters: dict[str, Character]) -> None:
    assert "Crisis" in activated("Honestly I want to hurt myself.", characters["hush"])
