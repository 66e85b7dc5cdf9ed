"""Card JSON objects (V1, V2, V3) <-> `Character`, and the rules for changing version.

Reading: a card with `spec: chara_card_v3` is V3, `chara_card_v2` (or a `data` object without
`spec`) is V2, a flat object with `name` is V1. Writing any version from any version:

- V3 writes every field. Lorebook entries without `use_regex` get `false` (V3 requires it).
- V2 cannot hold the V3-only fields (`assets`, `nickname`, `creator_notes_multilingual`,
  `source`, `group_only_greetings`, `creation_date`, `modification_date`): they move into
  `data.extensions.talkloop.v3` (an empty `group_only_greetings` is left out). Reading a V2
  card moves them back, so V3 -> V2 -> V3 is lossless. V3 fields that a V2 card carried inline
  in `data` (as SillyTavern writes them) stay inline. Lorebook `use_regex` and string `id`s are
  written as they are (SillyTavern does the same; V2 readers ignore them).
- V1 keeps the six V1 fields and the card's own top-level keys; the rest has no place in V1
  and is dropped.
- Keys beside `data` that no spec defines come back as found, except SillyTavern's V1 mirror
  (`name`, `description`, ... at top level), which is refreshed from the character.
- `spec_version` is written as "2.0" / "3.0"; `null` in a required field comes back empty.
"""

from __future__ import annotations

import copy
from typing import Any

from talkloop.characters.cards.card_file import CardVersion
from talkloop.characters.errors import CardFormatError
from talkloop.characters.model import TALKLOOP_EXTENSION, Character

SPECS = {CardVersion.V2: "chara_card_v2", CardVersion.V3: "chara_card_v3"}
SPEC_VERSIONS = {CardVersion.V2: "2.0", CardVersion.V3: "3.0"}
V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
ENVELOPE_KEYS = ("spec", "spec_version", "data")
STASH_KEY = "v3"
"""`data.extensions.talkloop.v3`: the V3-only fields of a card written as V2."""


def detect_version(card: dict[str, Any], source: str | None = None) -> CardVersion:
    """The spec version a card object claims (or, for old cards, its shape)."""
    spec = card.get("spec")
    if spec is None:
        if isinstance(card.get("data"), dict):
            return CardVersion.V2
        if "name" in card:
            return CardVersion.V1
        raise CardFormatError(
            "not a character card: the object has no `spec`, `data` or `name` key",
            source=source,
        )
    for version, name in SPECS.items():
        if spec == name:
            return version
    raise CardFormatError(
        f"unknown card spec {spec!r}; expected 'chara_card_v2' or 'chara_card_v3'",
        field="spec",
        source=source,
    )


def character_from_card(
    card: dict[str, Any], source: str | None = None
) -> tuple[Character, CardVersion]:
    """Map a card object of any version onto `Character`; bad fields raise with their path."""
    version = detect_version(card, source)
    if version is CardVersion.V1:
        return _from_v1(card, source), version
    data = card.get("data")
    if not isinstance(data, dict):
        raise CardFormatError(
            f"expected an object, got {type(data).__name__}", field="data", source=source
        )
    card_fields = {key: value for key, value in card.items() if key not in ENVELOPE_KEYS}
    if version is CardVersion.V3:
        character = Character.from_spec(data, path="data", source=source)
        return character.with_changes(card_fields=card_fields), version
    return _from_v2(data, card_fields, source), version


def _from_v1(card: dict[str, Any], source: str | None) -> Character:
    data = {key: card[key] for key in V1_FIELDS if key in card}
    character = Character.from_spec(data, source=source)
    return character.with_changes(
        card_fields={key: value for key, value in card.items() if key not in V1_FIELDS}
    )


def _from_v2(data: dict[str, Any], card_fields: dict[str, Any], source: str | None) -> Character:
    inline = tuple(name for name in Character.V3_ONLY if name in data)
    data, stash = _pop_stash(data)
    for name, value in stash.items():
        data.setdefault(name, value)
    character = Character.from_spec(data, path="data", source=source)
    return character.with_changes(card_fields=card_fields, v2_inline_fields=inline)


def _pop_stash(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Take `extensions.talkloop.v3` out of V2 `data` (a copy); returns (data, stash)."""
    extensions = data.get("extensions")
    namespace = extensions.get(TALKLOOP_EXTENSION) if isinstance(extensions, dict) else None
    if not isinstance(namespace, dict) or not isinstance(namespace.get(STASH_KEY), dict):
        return data, {}
    data = {**data, "extensions": copy.deepcopy(extensions)}
    namespace = data["extensions"][TALKLOOP_EXTENSION]
    stash = namespace.pop(STASH_KEY)
    if not namespace:
        del data["extensions"][TALKLOOP_EXTENSION]
    return data, {name: value for name, value in stash.items() if name in Character.V3_ONLY}


def card_from_character(character: Character, version: CardVersion) -> dict[str, Any]:
    """The card object for `version`, downgrading as the module docstring says."""
    if version is CardVersion.V1:
        fields = {name: getattr(character, name) for name in V1_FIELDS}
        return {**copy.deepcopy(character.card_fields), **fields}
    data = character.to_spec()
    data = _v3_data(data) if version is CardVersion.V3 else _v2_data(character, data)
    return {
        **_card_fields(character),
        "spec": SPECS[version],
        "spec_version": SPEC_VERSIONS[version],
        "data": data,
    }


def _card_fields(character: Character) -> dict[str, Any]:
    """Top-level extra keys, with SillyTavern's V1 mirror refreshed from the character."""
    fields = copy.deepcopy(character.card_fields)
    for name in V1_FIELDS:
        if name in fields:
            fields[name] = getattr(character, name)
    return fields


def _v3_data(data: dict[str, Any]) -> dict[str, Any]:
    book = data.get("character_book")
    for entry in book.get("entries", []) if isinstance(book, dict) else []:
        if entry.get("use_regex") is None:
            entry["use_regex"] = False
    return data


def _v2_data(character: Character, data: dict[str, Any]) -> dict[str, Any]:
    stash: dict[str, Any] = {}
    for name in Character.V3_ONLY:
        if name not in data or name in character.v2_inline_fields:
            continue
        value = data.pop(name)
        if name != "group_only_greetings" or value:
            stash[name] = value
    if stash:
        extensions = data["extensions"]
        namespace = extensions.get(TALKLOOP_EXTENSION)
        namespace = namespace if isinstance(namespace, dict) else {}
        extensions[TALKLOOP_EXTENSION] = {**namespace, STASH_KEY: stash}
    return data
