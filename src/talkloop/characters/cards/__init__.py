"""Character card files: read and write V1, V2 and V3 cards as JSON, PNG and CHARX.

`load_card` / `read_card` sniff the format and never write anything; `save_card` returns the
bytes of a card in any format and version (see `versions` for the downgrade rules). Every bad
file raises `CardFormatError` naming the file, chunk, member or field at fault.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from talkloop.characters.cards.card_file import CardFile, CardFormat, CardVersion, resolve_uri
from talkloop.characters.cards.charx import read_charx_card, write_charx_card
from talkloop.characters.cards.json_card import read_json_card, write_json_card
from talkloop.characters.cards.limits import CardLimits
from talkloop.characters.cards.png import PNG_SIGNATURE, read_png_card, write_png_card
from talkloop.characters.errors import CardFormatError
from talkloop.characters.model import Character

__all__ = [
    "CardFile",
    "CardFormat",
    "CardLimits",
    "CardVersion",
    "load_card",
    "read_card",
    "resolve_uri",
    "save_card",
    "sniff_format",
]

CardSource = str | os.PathLike[str] | bytes
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
_READERS = {
    CardFormat.JSON: read_json_card,
    CardFormat.PNG: read_png_card,
    CardFormat.CHARX: read_charx_card,
}
_SUFFIXES = {".png": CardFormat.PNG, ".apng": CardFormat.PNG, ".charx": CardFormat.CHARX}


def load_card(source: CardSource, *, limits: CardLimits | None = None) -> Character:
    """The character in a card file (path) or card bytes, whatever its format and version."""
    return read_card(source, limits=limits).character


def read_card(
    source: CardSource, *, format: CardFormat | None = None, limits: CardLimits | None = None
) -> CardFile:
    """The character plus its format, version, image and embedded files."""
    limits = limits or CardLimits()
    raw, name = _read_source(source, limits)
    chosen = format or sniff_format(raw, name)
    return _READERS[chosen](raw, name, limits)


def _read_source(source: CardSource, limits: CardLimits) -> tuple[bytes, str | None]:
    if isinstance(source, bytes):
        limits.check_file_size(len(source), None)
        return source, None
    path = Path(source)
    limits.check_file_size(path.stat().st_size, str(path))
    raw = path.read_bytes()
    limits.check_file_size(len(raw), str(path))  # it may have grown since stat
    return raw, str(path)


def sniff_format(raw: bytes, name: str | None = None) -> CardFormat:
    """PNG or zip by signature, else a JSON object; a file's suffix must agree."""
    if raw.startswith(PNG_SIGNATURE):
        return CardFormat.PNG
    if raw.startswith(ZIP_SIGNATURES):
        return CardFormat.CHARX
    expected = _SUFFIXES.get(Path(name).suffix.lower()) if name else None
    if expected is CardFormat.PNG:
        raise CardFormatError(
            f"not a PNG file: it starts with {raw[:8]!r}, a PNG starts with {PNG_SIGNATURE!r}",
            source=name,
        )
    if expected is CardFormat.CHARX:
        raise CardFormatError("not a CHARX file: a CHARX is a zip archive", source=name)
    if raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        return CardFormat.JSON
    raise CardFormatError(
        f"not a character card: it starts with {raw[:8]!r}; "
        "expected a PNG, a CHARX (zip) or a JSON object",
        source=name,
    )


def save_card(
    character: Character,
    format: CardFormat | str = CardFormat.PNG,
    version: CardVersion | int = CardVersion.V3,
    *,
    image: bytes | None = None,
    files: Mapping[str, bytes] | None = None,
) -> bytes:
    """The bytes of `character` as a card file; writes nothing to disk.

    `image` is the PNG card's picture (or, for CHARX, the main icon when that is
    `ccdefault:`); `files` are the CHARX members by archive path (`CardFile.files`). JSON
    carries neither; PNG carries only `image`.
    """
    chosen = CardFormat(format)
    card_version = CardVersion(version)
    if chosen is CardFormat.JSON:
        return write_json_card(character, card_version)
    if chosen is CardFormat.PNG:
        return write_png_card(character, card_version, image)
    return write_charx_card(character, card_version, files or {}, image)
