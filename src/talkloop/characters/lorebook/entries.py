"""Lorebook entries compiled for scanning: one `CompiledEntry` per enabled `LorebookEntry`.

Resolves, once per lorebook, everything an entry's card JSON spreads over fields,
SillyTavern `extensions` and V3 decorators: keys (plain or regex), case and whole-word
matching, scan depth, position, depth and role, timing and recursion flags. Matching and
activation live in `activation.py`; the data model itself in `characters.model`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from talkloop.characters.lorebook.decorators import ROLES, Decorators, Role, parse_decorators
from talkloop.characters.lorebook.keys import PlainKey, RegexKey, parse_key
from talkloop.characters.model import Lorebook, LorebookEntry, SelectiveLogic

Key = PlainKey | RegexKey


class LorePosition(StrEnum):
    """Where activated content goes in the prompt."""

    BEFORE_CHAR = "before_char"
    AFTER_CHAR = "after_char"
    BEFORE_EXAMPLES = "before_examples"
    AFTER_EXAMPLES = "after_examples"
    AT_DEPTH = "at_depth"


# SillyTavern's `extensions.position` numbers. It has no author's note here yet, so the two
# author's-note positions (2, 3) and the outlet (7) fold into AFTER_CHAR.
_ST_POSITIONS: Mapping[int, LorePosition] = {
    0: LorePosition.BEFORE_CHAR,
    1: LorePosition.AFTER_CHAR,
    2: LorePosition.AFTER_CHAR,
    3: LorePosition.AFTER_CHAR,
    4: LorePosition.AT_DEPTH,
    5: LorePosition.BEFORE_EXAMPLES,
    6: LorePosition.AFTER_EXAMPLES,
    7: LorePosition.AFTER_CHAR,
}

# Values of the V3 `@@position` decorator (and the entry's own `position` field) understood
# here; V3 says an unsupported value is ignored.
_NAMED_POSITIONS: Mapping[str, LorePosition] = {
    "before_char": LorePosition.BEFORE_CHAR,
    "before_desc": LorePosition.BEFORE_CHAR,
    "after_char": LorePosition.AFTER_CHAR,
    "after_desc": LorePosition.AFTER_CHAR,
    "before_example": LorePosition.BEFORE_EXAMPLES,
    "before_examples": LorePosition.BEFORE_EXAMPLES,
    "after_example": LorePosition.AFTER_EXAMPLES,
    "after_examples": LorePosition.AFTER_EXAMPLES,
}

DEFAULT_DEPTH = 4  # SillyTavern's default for at-depth entries without a depth


@dataclass(frozen=True)
class EntryDefaults:
    """Settings an entry falls back to when neither it nor its book says otherwise."""

    scan_depth: int = 2
    case_sensitive: bool = False
    match_whole_words: bool = False


@dataclass(frozen=True)
class Placement:
    position: LorePosition
    depth: int = 0
    role: Role = "system"


@dataclass(frozen=True)
class CompiledEntry:
    """An enabled entry, ready to scan. `uid` is unique across the books of one scanner."""

    uid: str
    book_rank: int
    index: int
    content: str
    primary_keys: tuple[Key, ...]
    secondary_keys: tuple[Key, ...]
    additional_keys: tuple[Key, ...]
    exclude_keys: tuple[Key, ...]
    selective: bool
    logic: SelectiveLogic
    whole_words: bool
    scan_depth: int
    constant: bool
    decorators: Decorators
    placement: Placement
    insertion_order: float
    priority: float
    recursion_allowed: bool
    prevent_recursion: bool
    from_character_book: bool

    @property
    def keyless(self) -> bool:
        """Activates without any key: constant, or forced on by `@@activate`."""
        return self.constant or self.decorators.activate

    @property
    def stable(self) -> bool:
        """Same content in the same place every turn, for every user of the character."""
        return self.from_character_book and self.keyless and not self.decorators.depends_on_turn

    @property
    def all_keys(self) -> tuple[Key, ...]:
        keys = self.primary_keys + self.secondary_keys
        return keys + self.additional_keys + self.exclude_keys


def _ext(entry: LorebookEntry, name: str) -> Any:
    return entry.extensions.get(name)


def _int_or(value: Any, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return int(value)


def _bool_or(value: Any, default: bool) -> bool:
    return value if isinstance(value, bool) else default


def resolve_placement(entry: LorebookEntry, decorators: Decorators) -> Placement:
    """Decorators first (`@@position` beats `@@depth`), then SillyTavern extensions, then the
    entry's `position`; V2 readers treat a missing position as after the character."""
    role = decorators.role or _st_role(_ext(entry, "role"))
    by_decorator = _NAMED_POSITIONS.get(decorators.position or "")
    if by_decorator is not None:
        return Placement(by_decorator, 0, role)
    if decorators.depth is not None:
        return Placement(LorePosition.AT_DEPTH, decorators.depth, role)
    position = _st_position(_ext(entry, "position"))
    if position is None:
        position = _NAMED_POSITIONS.get(entry.position or "", LorePosition.AFTER_CHAR)
    depth = max(0, _int_or(_ext(entry, "depth"), DEFAULT_DEPTH))
    return Placement(position, depth if position is LorePosition.AT_DEPTH else 0, role)


def _st_position(value: Any) -> LorePosition | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return _ST_POSITIONS.get(value)


def _st_role(value: Any) -> Role:
    # SillyTavern stores roles as 0 (system), 1 (user), 2 (assistant).
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(ROLES):
        return ROLES[value]
    return "system"


def _keys(raw: Sequence[str], *, case_sensitive: bool, use_regex: bool) -> tuple[Key, ...]:
    parsed = (parse_key(key, case_sensitive=case_sensitive, use_regex=use_regex) for key in raw)
    return tuple(key for key in parsed if key is not None)


@dataclass(frozen=True)
class BookContext:
    """What an entry needs to know about the book it sits in."""

    rank: int
    label: str
    scan_depth: int
    recursive: bool
    is_character_book: bool


def book_context(
    book: Lorebook, rank: int, label: str, *, is_character_book: bool, defaults: EntryDefaults
) -> BookContext:
    """A book's own scan depth and recursion switch, or the defaults when it has none."""
    scan_depth = max(0, _int_or(book.scan_depth, defaults.scan_depth))
    recursive = book.recursive_scanning is not False
    return BookContext(rank, label, scan_depth, recursive, is_character_book)


def compile_entry(
    entry: LorebookEntry, index: int, book: BookContext, defaults: EntryDefaults
) -> CompiledEntry:
    """Resolve one entry; per V3, `use_regex` makes every key list of the entry regex."""
    parsed = parse_decorators(entry.content)
    decorators = parsed.decorators
    case_sensitive = entry.case_sensitive
    if case_sensitive is None:
        case_sensitive = _bool_or(_ext(entry, "case_sensitive"), defaults.case_sensitive)
    regex = bool(entry.use_regex)

    def keys(raw: Sequence[str]) -> tuple[Key, ...]:
        return _keys(raw, case_sensitive=case_sensitive, use_regex=regex)

    scan_depth = decorators.scan_depth
    if scan_depth is None:
        scan_depth = max(0, _int_or(_ext(entry, "scan_depth"), book.scan_depth))
    entry_id = entry.id if entry.id is not None else index
    insertion_order = float(entry.insertion_order)
    return CompiledEntry(
        uid=f"{book.label}#{entry_id}",
        book_rank=book.rank,
        index=index,
        content=parsed.content,
        primary_keys=keys(entry.keys),
        secondary_keys=keys(entry.secondary_keys or []),
        additional_keys=keys(decorators.additional_keys),
        exclude_keys=keys(decorators.exclude_keys),
        selective=entry.selective is not False,
        logic=entry.selective_logic,
        whole_words=_bool_or(_ext(entry, "match_whole_words"), defaults.match_whole_words),
        scan_depth=scan_depth,
        constant=bool(entry.constant),
        decorators=decorators,
        placement=resolve_placement(entry, decorators),
        insertion_order=insertion_order,
        priority=insertion_order if entry.priority is None else float(entry.priority),
        recursion_allowed=book.recursive and not _bool_or(_ext(entry, "exclude_recursion"), False),
        prevent_recursion=_bool_or(_ext(entry, "prevent_recursion"), False),
        from_character_book=book.is_character_book,
    )


def compile_book(
    book: Lorebook, context: BookContext, defaults: EntryDefaults
) -> list[CompiledEntry]:
    """The enabled entries with content; V3: a disabled entry never matches, in any case."""
    compiled = (
        compile_entry(entry, index, context, defaults)
        for index, entry in enumerate(book.entries)
        if entry.enabled
    )
    return [entry for entry in compiled if entry.content.strip()]
