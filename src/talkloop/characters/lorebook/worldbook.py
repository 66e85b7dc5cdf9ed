"""Standalone world books on disk: V3 `lorebook_v3` JSON files, plus SillyTavern's own
world-info export on read.

Loading always yields the one `Lorebook` model (stackable with a character's book in a
`LoreScanner`); saving always writes `{"spec": "lorebook_v3", "data": ...}`. Unknown keys
survive a load/save round trip. Scanning is not done here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from talkloop.characters.errors import CardFormatError
from talkloop.characters.model import Lorebook

LOREBOOK_SPEC = "lorebook_v3"


class LorebookFileError(CardFormatError):
    """A world book file or object cannot be read or written as given."""


# SillyTavern world-info entry fields -> V3 entry fields.
_ST_FIELDS: Mapping[str, str] = {
    "key": "keys",
    "keysecondary": "secondary_keys",
    "content": "content",
    "comment": "comment",
    "constant": "constant",
    "selective": "selective",
    "order": "insertion_order",
    "uid": "id",
    "caseSensitive": "case_sensitive",
}
# SillyTavern world-info entry fields -> the `extensions` names its character books use.
_ST_EXTENSIONS: Mapping[str, str] = {
    "position": "position",
    "depth": "depth",
    "role": "role",
    "selectiveLogic": "selectiveLogic",
    "scanDepth": "scan_depth",
    "matchWholeWords": "match_whole_words",
    "excludeRecursion": "exclude_recursion",
    "preventRecursion": "prevent_recursion",
    "caseSensitive": "case_sensitive",
}


def lorebook_from_json(raw: Any, *, source: str | None = None) -> Lorebook:
    """Read a `lorebook_v3` object (or SillyTavern's `{"entries": {uid: ...}}` export)."""
    if not isinstance(raw, dict):
        raise LorebookFileError(
            f"expected a JSON object with spec 'lorebook_v3', got {type(raw).__name__}",
            source=source,
        )
    if "spec" in raw:
        return _from_v3(raw, source)
    if isinstance(raw.get("entries"), dict):
        return _from_sillytavern(raw, source)
    raise LorebookFileError(
        "not a world book: expected spec 'lorebook_v3' with 'data', or SillyTavern's "
        "'entries' object",
        source=source,
    )


def _from_v3(raw: dict[str, Any], source: str | None) -> Lorebook:
    if raw["spec"] != LOREBOOK_SPEC:
        raise LorebookFileError(
            f"spec is {raw['spec']!r}, expected {LOREBOOK_SPEC!r}", field="spec", source=source
        )
    if not isinstance(raw.get("data"), dict):
        raise LorebookFileError("expected an object", field="data", source=source)
    return _validated(raw["data"], "data", source)


def _from_sillytavern(raw: dict[str, Any], source: str | None) -> Lorebook:
    entries = []
    for uid, entry in raw["entries"].items():
        if not isinstance(entry, dict):
            raise LorebookFileError("expected an object", field=f"entries.{uid}", source=source)
        entries.append(_st_entry(entry))
    book: dict[str, Any] = {"entries": entries}
    if isinstance(raw.get("name"), str):
        book["name"] = raw["name"]
    return _validated(book, "", source)


def _validated(data: dict[str, Any], path: str, source: str | None) -> Lorebook:
    try:
        return Lorebook.from_spec(data, path=path, source=source)
    except CardFormatError as exc:
        raise LorebookFileError(exc.reason, field=exc.field, source=exc.source) from None


def _st_entry(entry: dict[str, Any]) -> dict[str, Any]:
    converted = {v3: entry[st] for st, v3 in _ST_FIELDS.items() if entry.get(st) is not None}
    converted["enabled"] = not entry.get("disable", False)
    extensions = {v3: entry[st] for st, v3 in _ST_EXTENSIONS.items() if st in entry}
    converted["extensions"] = extensions
    if isinstance(extensions.get("position"), int):
        converted["position"] = "before_char" if extensions["position"] == 0 else "after_char"
    return converted


def lorebook_to_json(book: Lorebook) -> dict[str, Any]:
    """The V3 standalone form: `{"spec": "lorebook_v3", "data": <Lorebook>}`."""
    return {"spec": LOREBOOK_SPEC, "data": book.to_spec()}


def load_lorebook(path: str | os.PathLike[str]) -> Lorebook:
    """Read a world book file; errors name the file and what is wrong in it."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LorebookFileError(f"not UTF-8 text ({exc.reason})", source=source) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        message = f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise LorebookFileError(message, source=source) from None
    return lorebook_from_json(raw, source=source)


def save_lorebook(book: Lorebook, path: str | os.PathLike[str]) -> None:
    """Write `book` as `lorebook_v3` JSON, atomically (a crash leaves the old file whole)."""
    target = Path(path)
    text = json.dumps(lorebook_to_json(book), ensure_ascii=False, indent=2) + "\n"
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
