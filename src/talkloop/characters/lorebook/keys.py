"""Key matching for lorebooks: plain keys through one precompiled keyword index, regex keys
one by one.

`KeywordIndex` turns every plain key of a lorebook into a single trie-shaped regex built once,
so a scan costs one C-level pass per text instead of one search per key. It reports which keys
occur in a text and whether each occurs as a whole word. It knows nothing about entries.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# `/pattern/flags`, the way SillyTavern writes a regex key.
_REGEX_KEY = re.compile(r"/(.+)/([a-z]*)", re.DOTALL)
_JS_FLAGS = {"i": re.IGNORECASE, "s": re.DOTALL, "m": re.MULTILINE}
_IGNORED_JS_FLAGS = frozenset("guyd")


@dataclass(frozen=True)
class PlainKey:
    """A literal key: `text` is already lower-cased when the key is case-insensitive."""

    text: str
    case_sensitive: bool


@dataclass(frozen=True)
class RegexKey:
    """A regex key; `pattern` is None when it did not compile (it then never matches)."""

    source: str
    pattern: re.Pattern[str] | None


def compile_regex(source: str, *, case_sensitive: bool) -> RegexKey:
    """Compile `/pattern/flags` or a bare pattern; a bad pattern yields a never-matching key."""
    match = _REGEX_KEY.fullmatch(source)
    body, js_flags = (match.group(1), match.group(2)) if match else (source, "")
    flags = 0 if case_sensitive or match else re.IGNORECASE
    for flag in js_flags:
        if flag not in _JS_FLAGS and flag not in _IGNORED_JS_FLAGS:
            logger.debug("regex key %r has unknown flag %r; ignored", source, flag)
        flags |= _JS_FLAGS.get(flag, 0)
    try:
        return RegexKey(source, re.compile(body, flags))
    except re.error as exc:
        logger.debug("regex key %r does not compile (%s); it never matches", source, exc)
        return RegexKey(source, None)


class RegexSet:
    """The distinct compiled regex keys of a lorebook; each is searched on its own.

    NOTE: one combined alternation was tried as a prefilter and measured no faster: Python's
    `re` cannot skip ahead through an alternation of case-insensitive patterns.
    """

    def __init__(self, keys: Iterable[RegexKey]) -> None:
        self.keys = tuple(dict.fromkeys(k for k in keys if k.pattern is not None))

    def matching(self, text: str, keys: Iterable[RegexKey] | None = None) -> set[RegexKey]:
        """The keys (of `keys`, default all) that match somewhere in `text`."""
        pool = self.keys if keys is None else keys
        return {key for key in pool if key.pattern is not None and key.pattern.search(text)}


def parse_key(raw: str, *, case_sensitive: bool, use_regex: bool) -> PlainKey | RegexKey | None:
    """One key as written in a card; None for an empty key."""
    text = raw.strip()
    if not text:
        return None
    if use_regex or _REGEX_KEY.fullmatch(text):
        return compile_regex(text, case_sensitive=case_sensitive)
    return PlainKey(text if case_sensitive else text.lower(), case_sensitive)


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def _bounded(text: str, start: int, end: int) -> bool:
    """No word character touches [start, end): the key stands as a whole word (or words)."""
    before_ok = start == 0 or not _is_word_char(text[start - 1])
    return before_ok and (end == len(text) or not _is_word_char(text[end]))


class _Trie:
    """Characters to children; `END` marks where a key ends."""

    END = ""

    def __init__(self, words: Iterable[str]) -> None:
        self.root: dict[str, dict] = {}  # type: ignore[type-arg]
        for word in words:
            node = self.root
            for char in word:
                node = node.setdefault(char, {})
            node[self.END] = {}

    def to_regex(self) -> str:
        return self._emit(self.root)

    def _emit(self, node: dict) -> str:  # type: ignore[type-arg]
        # Follow single-child chains iteratively so recursion depth is the branch depth.
        chain = []
        while len(node) == 1 and self.END not in node:
            ((char, node),) = node.items()
            chain.append(re.escape(char))
        branches = [re.escape(char) + self._emit(child) for char, child in node.items() if char]
        if not branches:
            return "".join(chain)
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if self.END in node:
            body = f"(?:{body})?"  # greedy: the longer key is tried first
        return "".join(chain) + body


class KeywordIndex:
    """All plain keys of a lorebook, found in one pass per text.

    NOTE: the combined regex finds the longest key starting at each position; the keys that
    are prefixes of it (`dragon` inside `dragonfly`) come from a precomputed prefix closure,
    and the search restarts one character later, so overlapping keys are all reported.
    """

    def __init__(self, keys: Iterable[PlainKey]) -> None:
        unique = sorted(set(keys), key=lambda key: (key.case_sensitive, key.text))
        self.keys: tuple[PlainKey, ...] = tuple(unique)
        self._folded = self._build([k.text for k in unique if not k.case_sensitive], False)
        self._exact = self._build([k.text for k in unique if k.case_sensitive], True)

    @staticmethod
    def _build(words: list[str], case_sensitive: bool) -> _CompiledKeys:
        if not words:
            return _CompiledKeys(None, {})
        keys = {word: PlainKey(word, case_sensitive) for word in words}
        prefixes = {
            word: tuple(
                (keys[word[:end]], end) for end in range(1, len(word) + 1) if word[:end] in keys
            )
            for word in words
        }
        return _CompiledKeys(re.compile(_Trie(words).to_regex()), prefixes)

    def find(self, text: str) -> dict[PlainKey, bool]:
        """Every indexed key in `text`, mapped to whether some occurrence is a whole word."""
        found: dict[PlainKey, bool] = {}
        self._folded.collect(text.lower(), found)
        self._exact.collect(text, found)
        return found


@dataclass(frozen=True)
class _CompiledKeys:
    """One trie regex plus, per key, the indexed keys that are its prefixes (with lengths)."""

    pattern: re.Pattern[str] | None
    prefixes: dict[str, tuple[tuple[PlainKey, int], ...]]

    def collect(self, text: str, found: dict[PlainKey, bool]) -> None:
        if self.pattern is None:
            return
        search, prefixes = self.pattern.search, self.prefixes
        position = 0
        while (match := search(text, position)) is not None:
            start = match.start()
            for key, length in prefixes[match.group()]:
                if not found.get(key, False):
                    found[key] = _bounded(text, start, start + length)
            position = start + 1
