"""Card JSON text: decode a `.json` card (or the JSON inside a PNG chunk or CHARX) and encode one.

Decoding checks size, UTF-8, JSON syntax and that the top level is an object; mapping the
object onto `Character` is `versions`' job.
"""

from __future__ import annotations

import json
from typing import Any

from talkloop.characters.cards.card_file import CardFile, CardFormat, CardVersion
from talkloop.characters.cards.limits import CardLimits
from talkloop.characters.cards.versions import card_from_character, character_from_card
from talkloop.characters.errors import CardFormatError
from talkloop.characters.model import Character


def decode_card_json(raw: bytes, source: str | None, limits: CardLimits) -> dict[str, Any]:
    """Bytes -> card object; a size, encoding or syntax problem raises `CardFormatError`."""
    limits.check_json_size(len(raw), source)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CardFormatError(
            f"card JSON is not valid UTF-8 (bad byte at offset {exc.start})", source=source
        ) from None
    try:
        card = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise CardFormatError(
            f"bad JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", source=source
        ) from None
    except (RecursionError, ValueError) as exc:
        raise CardFormatError(f"bad JSON: {exc}", source=source) from None
    if not isinstance(card, dict):
        raise CardFormatError(
            f"card JSON must be an object, got {type(card).__name__}", source=source
        )
    limits.check_json_depth(card, source)
    return card


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON; numbers must be finite")


def encode_card_json(card: dict[str, Any], *, indent: int | None = None) -> bytes:
    """Card object -> UTF-8 JSON (non-ASCII kept as is, as SillyTavern writes it)."""
    return json.dumps(card, ensure_ascii=False, indent=indent, allow_nan=False).encode("utf-8")


def read_json_card(raw: bytes, source: str | None, limits: CardLimits) -> CardFile:
    """A `.json` card of any version."""
    character, version = character_from_card(decode_card_json(raw, source, limits), source)
    return CardFile(character=character, format=CardFormat.JSON, version=version)


def write_json_card(character: Character, version: CardVersion) -> bytes:
    """`character` as a pretty-printed `.json` card of `version`."""
    return encode_card_json(card_from_character(character, version), indent=2)
