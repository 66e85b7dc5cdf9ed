"""The five original characters that ship with talkloop, and the world book two of them share.

Cards are V3 JSON files in `characters/` (the file stem is the character id); world books are
`lorebook_v3` JSON files in `world_books/`. A card names the world books it uses, by file stem,
in `extensions.talkloop.world_books`. Files are found with importlib.resources and read with
the card and world-book readers; nothing here writes or caches anything.
"""

from __future__ import annotations

import json
from importlib.resources import files
from importlib.resources.abc import Traversable

from talkloop.characters.cards import load_card
from talkloop.characters.errors import CardFormatError, CharacterError
from talkloop.characters.lorebook import lorebook_from_json
from talkloop.characters.model import Character, Lorebook

CHARACTERS_DIR = "characters"
WORLD_BOOKS_DIR = "world_books"
WORLD_BOOKS_KEY = "world_books"  # in extensions.talkloop: list of world book ids (file stems)
SUFFIX = ".json"


class BundledNotFoundError(CharacterError, KeyError):
    """No bundled character or world book has the requested id."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def bundled_character_paths() -> list[Traversable]:
    """The bundled card files, sorted by id."""
    return _json_files(CHARACTERS_DIR)


def bundled_character_ids() -> list[str]:
    return [_stem(path) for path in bundled_character_paths()]


def load_bundled_character(character_id: str) -> Character:
    return _load_card(_find(CHARACTERS_DIR, character_id, "character"))


def load_bundled_characters() -> list[Character]:
    """Every bundled character, in id order."""
    return [_load_card(path) for path in bundled_character_paths()]


def bundled_world_book_paths() -> list[Traversable]:
    return _json_files(WORLD_BOOKS_DIR)


def bundled_world_book_ids() -> list[str]:
    return [_stem(path) for path in bundled_world_book_paths()]


def load_bundled_world_book(book_id: str) -> Lorebook:
    path = _find(WORLD_BOOKS_DIR, book_id, "world book")
    source = f"talkloop bundled {WORLD_BOOKS_DIR}/{path.name}"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CardFormatError(f"not valid JSON: {exc.msg}", source=source) from None
    return lorebook_from_json(raw, source=source)


def world_book_ids(character: Character) -> list[str]:
    """The world book ids a card names in `extensions.talkloop.world_books` ([] if none)."""
    ids = character.talkloop.get(WORLD_BOOKS_KEY, [])
    if not isinstance(ids, list) or not all(isinstance(item, str) for item in ids):
        raise CardFormatError(
            f"character {character.name!r}: expected a list of world book ids, got {ids!r}",
            field=f"data.extensions.talkloop.{WORLD_BOOKS_KEY}",
        )
    return ids


def load_world_books_for(character: Character) -> list[Lorebook]:
    """The bundled world books a character references, in the order it names them."""
    return [load_bundled_world_book(book_id) for book_id in world_book_ids(character)]


def _json_files(folder: str) -> list[Traversable]:
    root = files(__name__) / folder
    found = [path for path in root.iterdir() if path.is_file() and path.name.endswith(SUFFIX)]
    return sorted(found, key=lambda path: path.name)


def _stem(path: Traversable) -> str:
    return path.name.removesuffix(SUFFIX)


def _find(folder: str, item_id: str, kind: str) -> Traversable:
    for path in _json_files(folder):
        if _stem(path) == item_id:
            return path
    available = [_stem(path) for path in _json_files(folder)]
    raise BundledNotFoundError(f"no bundled {kind} {item_id!r}; bundled: {available}")


def _load_card(path: Traversable) -> Character:
    try:
        return load_card(path.read_bytes())
    except CardFormatError as exc:
        source = f"talkloop bundled {CHARACTERS_DIR}/{path.name}"
        raise CardFormatError(exc.reason, field=exc.field, source=source) from exc
