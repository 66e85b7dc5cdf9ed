"""What one lorebook scan has seen so far, and whether a key counts as hit for an entry.

Chat hits are kept as the nearest distance per key (0 = the newest message), so entries with
different scan depths share one pass over the chat; text from activated entries (recursion)
is kept apart, since some entries may not be triggered by it. Deciding activation is
`activation.py`'s job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from talkloop.characters.lorebook.entries import CompiledEntry, Key
from talkloop.characters.lorebook.keys import PlainKey, RegexKey, RegexSet

_FAR = 1 << 30  # distance of a key never seen in the chat


@dataclass
class ScanState:
    """Key sightings of one scan: `window` holds the scanned messages, most recent first."""

    window: Sequence[str]
    regexes: RegexSet = field(default_factory=lambda: RegexSet(()))
    nearest_any: dict[PlainKey, int] = field(default_factory=dict)
    nearest_word: dict[PlainKey, int] = field(default_factory=dict)
    recursed: dict[PlainKey, bool] = field(default_factory=dict)
    """Plain keys seen in activated content -> whether one sighting was a whole word."""
    regex_recursed: set[RegexKey] = field(default_factory=set)
    _regex_chat: dict[int, set[RegexKey]] = field(default_factory=dict)
    _joined: dict[int, str] = field(default_factory=dict)

    def record_chat(self, distance: int, found: Mapping[PlainKey, bool]) -> None:
        """Messages must be recorded newest first: the first sighting is the nearest."""
        for key, whole_word in found.items():
            self.nearest_any.setdefault(key, distance)
            if whole_word:
                self.nearest_word.setdefault(key, distance)

    def record_recursion(self, text: str, found: Mapping[PlainKey, bool]) -> list[PlainKey]:
        """Add newly activated content; returns the plain keys whose sighting is new or
        became a whole-word one (their entries are worth re-checking)."""
        changed = [key for key, word in found.items() if self.recursed.get(key) is not True]
        for key in changed:
            self.recursed[key] = self.recursed.get(key, False) or found[key]
        unseen = (key for key in self.regexes.keys if key not in self.regex_recursed)
        self.regex_recursed |= self.regexes.matching(text, unseen)
        return changed

    def hit(self, entry: CompiledEntry, key: Key) -> bool:
        """Whether `key` is hit for `entry`: in its scan depth, or in activated content when
        the entry may be triggered by recursion."""
        if isinstance(key, PlainKey):
            return self._plain_hit(entry, key)
        return self._regex_hit(entry, key)

    def _plain_hit(self, entry: CompiledEntry, key: PlainKey) -> bool:
        nearest = self.nearest_word if entry.whole_words else self.nearest_any
        if nearest.get(key, _FAR) < entry.scan_depth:
            return True
        if not entry.recursion_allowed or key not in self.recursed:
            return False
        return self.recursed[key] or not entry.whole_words

    def _regex_hit(self, entry: CompiledEntry, key: RegexKey) -> bool:
        if key.pattern is None:
            return False  # V3: an invalid pattern is never a match
        depth = entry.scan_depth
        if depth not in self._regex_chat:
            self._regex_chat[depth] = self.regexes.matching(self._joined_window(depth))
        if key in self._regex_chat[depth]:
            return True
        return entry.recursion_allowed and key in self.regex_recursed

    def _joined_window(self, depth: int) -> str:
        if depth not in self._joined:
            self._joined[depth] = "\n".join(reversed(self.window[:depth]))
        return self._joined[depth]
