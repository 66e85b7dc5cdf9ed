"""Token counting for the character runtime: a one-method protocol and cheap stand-ins.

The runtime never imports the engine: callers pass any object with `count(text) -> int`
(the engine's tokenizer fits). This module only approximates; it does not tokenize.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

_WORD_PIECE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


@runtime_checkable
class TokenCounter(Protocol):
    """Anything that can say how many tokens a text costs."""

    def count(self, text: str) -> int: ...


@dataclass(frozen=True)
class ApproxTokenCounter:
    """Characters divided by `chars_per_token`, rounded up: the usual 4-chars-a-token guess.

    Over-counts slightly for English, which keeps budgets on the safe side.
    """

    chars_per_token: float = 4.0

    def __post_init__(self) -> None:
        if not self.chars_per_token > 0:
            raise ValueError(
                f"chars_per_token must be a positive number, got {self.chars_per_token!r}"
            )

    def count(self, text: str) -> int:
        return math.ceil(len(text) / self.chars_per_token)


@dataclass(frozen=True)
class WordTokenCounter:
    """One token per word and per punctuation mark: a stable, tokenizer-free count."""

    def count(self, text: str) -> int:
        return sum(1 for _ in _WORD_PIECE.finditer(text))


@dataclass
class CachingTokenCounter:
    """Memoises another counter: the stable prompt prefix is recounted every turn.

    NOTE: a bounded LRU keyed by the text itself; short texts are cheaper to recount
    than to hash, so only texts of `min_chars` or more are cached.
    """

    inner: TokenCounter
    max_entries: int = 4096
    min_chars: int = 64
    _cache: OrderedDict[str, int] = field(default_factory=OrderedDict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {self.max_entries}")

    def count(self, text: str) -> int:
        if len(text) < self.min_chars:
            return self.inner.count(text)
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            return cached
        num_tokens = self.inner.count(text)
        self._cache[text] = num_tokens
        if len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return num_tokens


DEFAULT_TOKEN_COUNTER: TokenCounter = ApproxTokenCounter()


def resolve_counter(counter: TokenCounter | None) -> TokenCounter:
    """The given counter, or the character-based approximation when none is given."""
    return DEFAULT_TOKEN_COUNTER if counter is None else counter
