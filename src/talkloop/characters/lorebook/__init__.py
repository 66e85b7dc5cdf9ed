"""Lorebooks (world info): decorators, key matching, activation and world-book files.

Build a `LoreScanner` once per character book plus world books (or take one from a
`ScannerCache`), then `scan` the recent messages each turn. The lorebook data model itself
(`Lorebook`, `LorebookEntry`) lives in `characters.model`.
"""

from talkloop.characters.lorebook.activation import (
    SELECTIVE_LOGICS,
    LoreScanner,
    ScannerCache,
    ScanSettings,
)
from talkloop.characters.lorebook.budget import ActivatedEntry, ActivatedLore
from talkloop.characters.lorebook.decorators import ROLES, Decorators, Role, parse_decorators
from talkloop.characters.lorebook.entries import EntryDefaults, LorePosition
from talkloop.characters.lorebook.keys import KeywordIndex, PlainKey, RegexKey, parse_key
from talkloop.characters.lorebook.worldbook import (
    LOREBOOK_SPEC,
    LorebookFileError,
    load_lorebook,
    lorebook_from_json,
    lorebook_to_json,
    save_lorebook,
)

__all__ = [
    "LOREBOOK_SPEC",
    "ROLES",
    "SELECTIVE_LOGICS",
    "ActivatedEntry",
    "ActivatedLore",
    "Decorators",
    "EntryDefaults",
    "KeywordIndex",
    "LorePosition",
    "LoreScanner",
    "LorebookFileError",
    "PlainKey",
    "RegexKey",
    "Role",
    "ScanSettings",
    "ScannerCache",
    "load_lorebook",
    "lorebook_from_json",
    "lorebook_to_json",
    "parse_decorators",
    "parse_key",
    "save_lorebook",
]
