"""History helpers (turns, at-depth insertion, trimming) and the token counters."""

from __future__ import annotations

import pytest

from talkloop.characters.prompt import DepthInsert, HistoryMessage, insert_at_depth, split_turns
from talkloop.characters.prompt.history import HistoryBudget, trim_history
from talkloop.characters.tokens import (
    ApproxTokenCounter,
    CachingTokenCounter,
    TokenCounter,
    WordTokenCounter,
    resolve_counter,
)

HISTORY = (
    HistoryMessage("assistant", "a0"),
    HistoryMessage("user", "u1"),
    HistoryMessage("assistant", "a1"),
    HistoryMessage("user", "u2"),
)


def test_turns_start_at_user_messages() -> None:
    assert [[m.content for m in turn] for turn in split_turns(HISTORY)] == [
        ["a0"],
        ["u1", "a1"],
        ["u2"],
    ]
    assert split_turns(()) == []


def contents(inserts: list[DepthInsert]) -> list[str]:
    return [f"{role}:{text}" for role, text, _ in insert_at_depth(HISTORY, inserts)]


def test_depth_counts_back_from_the_newest_message() -> None:
    assert contents([DepthInsert(0, "system", "L")]) == [
        "assistant:a0", "user:u1", "assistant:a1", "user:u2", "system:L",
    ]  # fmt: skip
    assert contents([DepthInsert(1, "user", "L")]) == [
        "assistant:a0", "user:u1", "assistant:a1", "user:L", "user:u2",
    ]  # fmt: skip


def test_depth_beyond_history_goes_first_and_groups_merge() -> None:
    inserts = [
        DepthInsert(9, "system", "deep"),
        DepthInsert(2, "assistant", "x"),
        DepthInsert(2, "system", "y"),
        DepthInsert(2, "system", "z"),
        DepthInsert(4, "system", "four"),
    ]
    assert contents(inserts) == [
        "system:deep", "system:four", "assistant:a0", "user:u1",
        "system:y\nz", "assistant:x", "assistant:a1", "user:u2",
    ]  # fmt: skip
    lore_flags = [is_lore for _, _, is_lore in insert_at_depth(HISTORY, inserts)]
    assert lore_flags == [True, True, False, False, True, True, False, False]


def test_empty_inserts_are_skipped() -> None:
    assert contents([DepthInsert(1, "system", "")]) == [m.role + ":" + m.content for m in HISTORY]


def budget(max_tokens: int, step: int = 1) -> HistoryBudget:
    return HistoryBudget(max_tokens, WordTokenCounter(), 0, "marker", step)


def test_trim_history_drops_whole_turns_and_never_the_latest() -> None:
    untrimmed = trim_history(HISTORY, budget(4))
    assert untrimmed is not None and untrimmed.num_trimmed_turns == 0
    trimmed = trim_history(HISTORY, budget(3))  # 1 token for the marker, 2 for turns
    assert trimmed is not None
    assert (trimmed.num_trimmed_turns, [m.content for m in trimmed.messages]) == (2, ["u2"])
    assert trim_history(HISTORY, budget(2)) is not None
    assert trim_history(HISTORY, budget(1)) is None


def test_trim_step_rounds_up_to_whole_steps_but_keeps_the_latest_turn() -> None:
    five_turns = [HistoryMessage("assistant", "hi")]
    five_turns += [HistoryMessage("user", f"u{i}") for i in range(4)]
    counts = [trim_history(five_turns, budget(4, step)) for step in (1, 3, 9)]
    assert [c.num_trimmed_turns if c else None for c in counts] == [2, 3, 4]


def test_approx_counter_is_chars_over_four_rounded_up() -> None:
    counter = ApproxTokenCounter()
    assert [counter.count(t) for t in ("", "abc", "abcd", "abcde")] == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="chars_per_token"):
        ApproxTokenCounter(0)


def test_word_counter_counts_words_and_punctuation() -> None:
    assert WordTokenCounter().count("Hello, world! It's") == 7


class CountingCounter:
    def __init__(self) -> None:
        self.calls = 0

    def count(self, text: str) -> int:
        self.calls += 1
        return len(text)


def test_caching_counter_memoises_long_texts_in_a_bounded_lru() -> None:
    inner = CountingCounter()
    cached = CachingTokenCounter(inner, max_entries=2, min_chars=3)
    for text in ("aaaa", "aaaa", "bbbb", "aaaa", "cccc", "bbbb", "x", "x"):
        cached.count(text)
    assert inner.calls == 6  # aaaa, bbbb, cccc, bbbb again (evicted), x twice (too short)
    assert isinstance(cached, TokenCounter)


def test_resolve_counter_defaults_to_the_approximation() -> None:
    assert isinstance(resolve_counter(None), ApproxTokenCounter)
    word = WordTokenCounter()
    assert resolve_counter(word) is word
