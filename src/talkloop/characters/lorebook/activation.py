"""Lorebook activation: which entries a turn's recent messages trigger.

`LoreScanner` compiles a character book plus any world books once (one keyword index, a
reverse key -> entries map) and then scans cheaply per turn: keys and secondary keys under
SillyTavern's selective logics, regex keys, constant entries, V3 timing decorators and
recursive scanning to a depth limit, admitting entries through the token budget. It returns
plain data grouped by position; it does not render macros or build messages (`prompt.py`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from talkloop.characters.lorebook.budget import ActivatedLore, Admission
from talkloop.characters.lorebook.entries import (
    CompiledEntry,
    EntryDefaults,
    Key,
    book_context,
    compile_book,
)
from talkloop.characters.lorebook.keys import KeywordIndex, PlainKey, RegexKey, RegexSet
from talkloop.characters.lorebook.state import ScanState
from talkloop.characters.model import Lorebook, SelectiveLogic
from talkloop.characters.tokens import TokenCounter, resolve_counter

# How secondary-key hits combine, given that a primary key hit (SillyTavern's semantics).
SELECTIVE_LOGICS: Mapping[SelectiveLogic, Callable[[Iterable[bool]], bool]] = {
    SelectiveLogic.AND_ANY: any,
    SelectiveLogic.AND_ALL: all,
    SelectiveLogic.NOT_ANY: lambda hits: not any(hits),
    SelectiveLogic.NOT_ALL: lambda hits: not all(hits),
}


@dataclass(frozen=True)
class ScanSettings:
    """Scanner-wide settings. A book's own `scan_depth` wins over `defaults.scan_depth`;
    `token_budget` set here wins over the books' (else the character book's, else the first
    world book's); `max_recursion_depth` counts scan rounds after the first (0: none)."""

    defaults: EntryDefaults = field(default_factory=EntryDefaults)
    token_budget: int | None = None
    max_recursion_depth: int = 3

    def __post_init__(self) -> None:
        if self.token_budget is not None and self.token_budget < 0:
            raise ValueError(f"token_budget must be >= 0 or None, got {self.token_budget}")
        if self.max_recursion_depth < 0:
            raise ValueError(f"max_recursion_depth must be >= 0, got {self.max_recursion_depth}")


def keys_match(state: ScanState, entry: CompiledEntry) -> bool:
    """A primary key, then V3 additional (one needed) and exclude (none allowed) keys, then
    secondary keys under the entry's selective logic."""

    def hits(keys: tuple[Key, ...]) -> Iterable[bool]:
        return (state.hit(entry, key) for key in keys)

    if not any(hits(entry.primary_keys)):
        return False
    if entry.additional_keys and not any(hits(entry.additional_keys)):
        return False
    if any(hits(entry.exclude_keys)):
        return False
    if not (entry.selective and entry.secondary_keys):
        return True
    return SELECTIVE_LOGICS[entry.logic](hits(entry.secondary_keys))


def decorators_verdict(entry: CompiledEntry, turn: int) -> bool | None:
    """True/False when decorators (or `constant`) decide alone, None when keys decide.
    `@@activate` wins over everything, then `@@dont_activate`, then the turn gates."""
    decorators = entry.decorators
    if decorators.activate:
        return True
    if decorators.dont_activate:
        return False
    after, every = decorators.activate_only_after, decorators.activate_only_every
    if after is not None and turn < after:
        return False
    if every is not None and turn % every:
        return False
    return True if entry.constant else None


def activates(state: ScanState, entry: CompiledEntry, turn: int) -> bool:
    verdict = decorators_verdict(entry, turn)
    return keys_match(state, entry) if verdict is None else verdict


def _labels(world_books: Sequence[Lorebook]) -> list[str]:
    """Unique uid prefixes for world books: their name, suffixed with the rank on a clash."""
    labels: list[str] = []
    for rank, book in enumerate(world_books, start=1):
        label = book.name or "world"
        clash = label in labels or label == "character"
        labels.append(f"{label}@{rank}" if clash else label)
    return labels


def _first_budget(books: Iterable[Lorebook | None]) -> int | None:
    budgets = [int(b.token_budget) for b in books if b is not None and b.token_budget is not None]
    return budgets[0] if budgets else None


def _tighter(first: int | None, second: int | None) -> int | None:
    limits = [limit for limit in (first, second) if limit is not None]
    return min(limits) if limits else None


class LoreScanner:
    """A character book stacked with world books, compiled once; `scan` once per turn.

    NOTE: entry uids are `character#<id>` for the character book and `<book name>#<id>` for
    world books (the entry's index stands in for a missing id).
    """

    def __init__(
        self,
        character_book: Lorebook | None = None,
        world_books: Sequence[Lorebook] = (),
        settings: ScanSettings | None = None,
    ) -> None:
        self.settings = settings or ScanSettings()
        self.entries = tuple(self._compile(character_book, world_books))
        self.token_budget = self.settings.token_budget
        if self.token_budget is None:
            self.token_budget = _first_budget([character_book, *world_books])
        plain = [k for e in self.entries for k in e.all_keys if isinstance(k, PlainKey)]
        self._index = KeywordIndex(plain)
        self._regexes = RegexSet(
            k for e in self.entries for k in e.all_keys if isinstance(k, RegexKey)
        )
        self._by_key: dict[PlainKey, list[CompiledEntry]] = {}
        for entry in self.entries:
            for key in dict.fromkeys(k for k in entry.all_keys if isinstance(k, PlainKey)):
                self._by_key.setdefault(key, []).append(entry)
        self._regex_entries = tuple(e for e in self.entries if _has_regex(e))
        self._keyless = tuple(e for e in self.entries if e.keyless)
        self._rank = {entry.uid: rank for rank, entry in enumerate(self.entries)}
        self._max_scan_depth = max((e.scan_depth for e in self.entries), default=0)

    def _compile(
        self, character_book: Lorebook | None, world_books: Sequence[Lorebook]
    ) -> Iterable[CompiledEntry]:
        defaults = self.settings.defaults
        if character_book is not None:
            context = book_context(
                character_book, 0, "character", is_character_book=True, defaults=defaults
            )
            yield from compile_book(character_book, context, defaults)
        labels = _labels(world_books)
        for rank, (book, label) in enumerate(zip(world_books, labels, strict=True), start=1):
            context = book_context(book, rank, label, is_character_book=False, defaults=defaults)
            yield from compile_book(book, context, defaults)

    def scan(
        self,
        messages: Sequence[str],
        *,
        turn: int,
        counter: TokenCounter | None = None,
        token_budget: int | None = None,
    ) -> ActivatedLore:
        """Activate entries for one turn.

        `messages` are the chat texts, oldest first; `turn` is the number of character
        (assistant) messages so far, which V3's `@@activate_only_after`/`_every` count;
        `token_budget` further caps the books' budget for this call.
        """
        state = self._read_chat(messages)
        admission = Admission(_tighter(self.token_budget, token_budget), resolve_counter(counter))
        candidates = self._first_candidates(state)
        fresh: list[CompiledEntry] = []
        for recursion_round in range(self.settings.max_recursion_depth + 1):
            if recursion_round:
                candidates = self._recursion_candidates(state, fresh)
            new = [e for e in candidates if e.uid not in admission and activates(state, e, turn)]
            fresh = admission.admit(new, recursion_round)
            if not fresh or admission.overflowed:
                break
        return admission.result()

    def _read_chat(self, messages: Sequence[str]) -> ScanState:
        recent = messages[len(messages) - self._max_scan_depth :] if self._max_scan_depth else []
        state = ScanState(window=list(reversed(recent)), regexes=self._regexes)
        for distance, text in enumerate(state.window):
            state.record_chat(distance, self._index.find(text))
        return state

    def _first_candidates(self, state: ScanState) -> list[CompiledEntry]:
        found = {e.uid: e for key in state.nearest_any for e in self._by_key.get(key, ())}
        for entry in (*self._keyless, *self._regex_entries):
            found.setdefault(entry.uid, entry)
        return sorted(found.values(), key=lambda entry: self._rank[entry.uid])

    def _recursion_candidates(
        self, state: ScanState, fresh: Sequence[CompiledEntry]
    ) -> list[CompiledEntry]:
        text = "\n".join(entry.content for entry in fresh if not entry.prevent_recursion)
        if not text:
            return []
        changed = state.record_recursion(text, self._index.find(text))
        found = {e.uid: e for key in changed for e in self._by_key.get(key, ())}
        for entry in self._regex_entries:
            found.setdefault(entry.uid, entry)
        eligible = (entry for entry in found.values() if entry.recursion_allowed)
        return sorted(eligible, key=lambda entry: self._rank[entry.uid])


def _has_regex(entry: CompiledEntry) -> bool:
    return any(isinstance(key, RegexKey) for key in entry.all_keys)


class ScannerCache:
    """Compiled scanners keyed by the identity of their books (held here, so an id cannot be
    reused while cached). NOTE: books are frozen models; edits made in place go unseen."""

    def __init__(self, max_entries: int = 64) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._scanners: OrderedDict[tuple[object, ...], tuple[object, LoreScanner]] = OrderedDict()

    def get(
        self,
        character_book: Lorebook | None,
        world_books: Sequence[Lorebook] = (),
        settings: ScanSettings | None = None,
    ) -> LoreScanner:
        settings = settings or ScanSettings()
        books = (character_book, *world_books)
        key = (*(id(book) for book in books), settings)
        cached = self._scanners.get(key)
        if cached is not None:
            self._scanners.move_to_end(key)
            return cached[1]
        scanner = LoreScanner(character_book, world_books, settings)
        self._scanners[key] = (books, scanner)
        if len(self._scanners) > self.max_entries:
            self._scanners.popitem(last=False)
        return scanner
