"""The lorebook token budget and the result it produces: `ActivatedLore`.

Activated entries are admitted in keep order (most important first) until one does not fit;
like SillyTavern, every entry after that is dropped too, so an entry is never kept while a
more important one was dropped. Which entries activate is `activation.py`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from talkloop.characters.lorebook.decorators import Role
from talkloop.characters.lorebook.entries import CompiledEntry, LorePosition
from talkloop.characters.tokens import TokenCounter


@dataclass(frozen=True)
class ActivatedEntry:
    """One activated entry: decorator-free content, where it goes and what it costs."""

    uid: str
    content: str
    position: LorePosition
    depth: int
    role: Role
    insertion_order: float
    priority: float
    num_tokens: int
    keyless: bool
    stable: bool
    """Character-book content that is the same every turn for every user (prefix-safe)."""
    recursion_round: int


@dataclass(frozen=True)
class ActivatedLore:
    """Activated entries by position, each group in insertion order, budget applied."""

    before_char: tuple[ActivatedEntry, ...] = ()
    after_char: tuple[ActivatedEntry, ...] = ()
    before_examples: tuple[ActivatedEntry, ...] = ()
    after_examples: tuple[ActivatedEntry, ...] = ()
    at_depth: tuple[ActivatedEntry, ...] = ()
    dropped_uids: tuple[str, ...] = ()
    """Entries that activated but did not fit the budget, most important first."""

    def at(self, position: LorePosition) -> tuple[ActivatedEntry, ...]:
        group: tuple[ActivatedEntry, ...] = getattr(self, position.value)
        return group

    @property
    def entries(self) -> tuple[ActivatedEntry, ...]:
        """Every kept entry, position by position (in `LorePosition` order)."""
        return tuple(entry for position in LorePosition for entry in self.at(position))

    @property
    def uids(self) -> tuple[str, ...]:
        return tuple(entry.uid for entry in self.entries)

    @property
    def num_tokens(self) -> int:
        return sum(entry.num_tokens for entry in self.entries)


def keep_order(entry: CompiledEntry) -> tuple[int, float, int, float, int]:
    """Budget order: stable character-book constants, then other keyless entries, then keyed
    ones; within a tier higher priority first, then the character book, then higher
    insertion order (V3: without `priority`, the lowest `insertion_order` goes first)."""
    tier = 0 if entry.stable else 1 if entry.keyless else 2
    return (tier, -entry.priority, entry.book_rank, -entry.insertion_order, entry.index)


class Admission:
    """Admits activated entries round by round until the budget (None: unlimited) overflows."""

    def __init__(self, budget: int | None, counter: TokenCounter) -> None:
        if budget is not None and budget < 0:
            raise ValueError(f"lore token budget must be >= 0 or None, got {budget}")
        self.budget = budget
        self.counter = counter
        self.num_tokens = 0
        self.overflowed = False
        self._kept: list[tuple[CompiledEntry, ActivatedEntry]] = []
        self._seen: set[str] = set()
        self._dropped: list[str] = []

    def __contains__(self, uid: str) -> bool:
        return uid in self._seen

    def admit(self, entries: Sequence[CompiledEntry], recursion_round: int) -> list[CompiledEntry]:
        """Admit `entries` in keep order; returns the ones kept."""
        fresh: list[CompiledEntry] = []
        for entry in sorted(entries, key=keep_order):
            self._seen.add(entry.uid)
            num_tokens = self.counter.count(entry.content)
            if self.overflowed or not self._fits(num_tokens):
                self.overflowed = True
                self._dropped.append(entry.uid)
                continue
            self.num_tokens += num_tokens
            self._kept.append((entry, _activated(entry, num_tokens, recursion_round)))
            fresh.append(entry)
        return fresh

    def _fits(self, num_tokens: int) -> bool:
        return self.budget is None or self.num_tokens + num_tokens <= self.budget

    def result(self) -> ActivatedLore:
        """Kept entries grouped by position, in insertion order (then book, then index)."""
        ordered = sorted(self._kept, key=lambda kept: _insertion_key(kept[0]))
        groups: dict[str, tuple[ActivatedEntry, ...]] = {
            position.value: tuple(a for _, a in ordered if a.position is position)
            for position in LorePosition
        }
        return ActivatedLore(**groups, dropped_uids=tuple(self._dropped))


def _insertion_key(entry: CompiledEntry) -> tuple[float, int, int]:
    return (entry.insertion_order, entry.book_rank, entry.index)


def _activated(entry: CompiledEntry, num_tokens: int, recursion_round: int) -> ActivatedEntry:
    placement = entry.placement
    return ActivatedEntry(
        uid=entry.uid,
        content=entry.content,
        position=placement.position,
        depth=placement.depth,
        role=placement.role,
        insertion_order=entry.insertion_order,
        priority=entry.priority,
        num_tokens=num_tokens,
        keyless=entry.keyless,
        stable=entry.stable,
        recursion_round=recursion_round,
    )
