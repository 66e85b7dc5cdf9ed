"""Lorebook activation: one test per rule (keys, logics, regex, case, words, depth, budget,
recursion, positions, stacking)."""

from __future__ import annotations

from typing import Any

import pytest

from talkloop.characters.lorebook import (
    ActivatedLore,
    EntryDefaults,
    LorePosition,
    LoreScanner,
    ScannerCache,
    ScanSettings,
)
from talkloop.characters.model import Lorebook, LorebookEntry, SelectiveLogic
from talkloop.characters.tokens import WordTokenCounter


def entry(uid: int, keys: list[str] | None = None, **fields: Any) -> LorebookEntry:
    fields.setdefault("content", f"content {uid}")
    return LorebookEntry(id=uid, keys=keys or [], **fields)


def scan(
    entries: list[LorebookEntry],
    messages: list[str],
    *,
    turn: int = 0,
    book: dict[str, Any] | None = None,
    **settings: Any,
) -> ActivatedLore:
    lorebook = Lorebook(entries=entries, **(book or {}))
    scanner = LoreScanner(lorebook, settings=ScanSettings(**settings))
    return scanner.scan(messages, turn=turn, counter=WordTokenCounter())


def uids(lore: ActivatedLore) -> list[str]:
    return list(lore.uids)


# --- keys and selective logic -------------------------------------------------------------


def test_primary_key_activates_and_absent_key_does_not() -> None:
    entries = [entry(1, ["dragon"]), entry(2, ["griffin"])]
    assert uids(scan(entries, ["A dragon appears."])) == ["character#1"]


def test_any_primary_key_is_enough() -> None:
    assert uids(scan([entry(1, ["wyrm", "dragon"])], ["the dragon"])) == ["character#1"]


def logic_entry(logic: SelectiveLogic) -> LorebookEntry:
    return entry(
        1,
        ["castle"],
        secondary_keys=["king", "queen"],
        selective=True,
        extensions={"selectiveLogic": int(logic)},
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("castle", False), ("castle king", True), ("castle king queen", True), ("king", False)],
)
def test_and_any(text: str, expected: bool) -> None:
    assert bool(scan([logic_entry(SelectiveLogic.AND_ANY)], [text]).entries) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("castle", False), ("castle king", False), ("castle king queen", True)],
)
def test_and_all(text: str, expected: bool) -> None:
    assert bool(scan([logic_entry(SelectiveLogic.AND_ALL)], [text]).entries) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("castle", True), ("castle king", False), ("castle king queen", False), ("queen", False)],
)
def test_not_any(text: str, expected: bool) -> None:
    assert bool(scan([logic_entry(SelectiveLogic.NOT_ANY)], [text]).entries) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("castle", True), ("castle king", True), ("castle king queen", False)],
)
def test_not_all(text: str, expected: bool) -> None:
    assert bool(scan([logic_entry(SelectiveLogic.NOT_ALL)], [text]).entries) is expected


def test_secondary_keys_ignored_when_not_selective() -> None:
    plain = entry(1, ["castle"], secondary_keys=["king"], selective=False)
    assert uids(scan([plain], ["castle"])) == ["character#1"]


# --- regex, case, whole words -------------------------------------------------------------


def test_use_regex_keys_are_patterns() -> None:
    regex = entry(1, [r"drag(on|in)s?\b"], use_regex=True)
    assert uids(scan([regex], ["Two DRAGINS"])) == ["character#1"]
    assert uids(scan([regex], ["dragnet"])) == []


def test_slash_form_regex_with_flags() -> None:
    assert uids(scan([entry(1, ["/^hello/im"])], ["x\nHELLO there"])) == ["character#1"]
    assert uids(scan([entry(1, ["/Hello/"])], ["hello"])) == []


def test_invalid_regex_never_matches() -> None:
    assert uids(scan([entry(1, ["(unclosed"], use_regex=True)], ["(unclosed"])) == []


def test_case_sensitive_entry() -> None:
    sensitive = entry(1, ["Rose"], case_sensitive=True)
    assert uids(scan([sensitive], ["a rose"])) == []
    assert uids(scan([sensitive], ["a Rose"])) == ["character#1"]


def test_case_insensitive_by_default_and_from_extensions() -> None:
    assert uids(scan([entry(1, ["Rose"])], ["a ROSE"])) == ["character#1"]
    via_ext = entry(1, ["Rose"], extensions={"case_sensitive": True})
    assert uids(scan([via_ext], ["a rose"])) == []


def test_whole_word_matching() -> None:
    whole = entry(1, ["cat"], extensions={"match_whole_words": True})
    assert uids(scan([whole], ["a category"])) == []
    assert uids(scan([whole], ["the cat!"])) == ["character#1"]
    assert uids(scan([entry(1, ["cat"])], ["a category"])) == ["character#1"]


def test_whole_word_default_setting_and_multi_word_keys() -> None:
    defaults = EntryDefaults(match_whole_words=True)
    assert uids(scan([entry(1, ["red fox"])], ["a red foxes den"], defaults=defaults)) == []
    assert uids(scan([entry(1, ["red fox"])], ["a red fox."], defaults=defaults)) == ["character#1"]


# --- constant, enabled, scan depth --------------------------------------------------------


def test_constant_entry_always_activates() -> None:
    assert uids(scan([entry(1, constant=True)], [])) == ["character#1"]


def test_disabled_entry_never_activates() -> None:
    entries = [
        entry(1, ["dragon"], enabled=False),
        entry(2, constant=True, enabled=False),
        entry(3, content="@@activate\nforced", enabled=False),
    ]
    assert uids(scan(entries, ["dragon"])) == []


def test_scan_depth_limits_recent_messages() -> None:
    messages = ["dragon here", "nothing", "nothing"]
    assert uids(scan([entry(1, ["dragon"])], messages)) == []  # default depth 2
    assert uids(scan([entry(1, ["dragon"])], messages, book={"scan_depth": 3})) == ["character#1"]
    deep = entry(1, ["dragon"], extensions={"scan_depth": 3})
    assert uids(scan([deep], messages)) == ["character#1"]


def test_scan_depth_zero_sees_no_messages() -> None:
    assert uids(scan([entry(1, ["dragon"])], ["dragon"], book={"scan_depth": 0})) == []


# --- order, priority, budget --------------------------------------------------------------


def test_groups_are_in_insertion_order() -> None:
    entries = [entry(i, ["key"], insertion_order=order) for i, order in [(1, 30), (2, 10), (3, 20)]]
    assert uids(scan(entries, ["key"])) == ["character#2", "character#3", "character#1"]


def test_budget_drops_lowest_priority_first() -> None:
    # each content is 2 words = 2 tokens with the word counter
    entries = [
        entry(i, ["key"], priority=p, insertion_order=i) for i, p in [(1, 5), (2, 9), (3, 1)]
    ]
    lore = scan(entries, ["key"], token_budget=4)
    assert uids(lore) == ["character#1", "character#2"]
    assert lore.dropped_uids == ("character#3",)


def test_budget_without_priority_uses_insertion_order() -> None:
    entries = [entry(i, ["key"], insertion_order=order) for i, order in [(1, 5), (2, 50), (3, 20)]]
    lore = scan(entries, ["key"], token_budget=4)
    assert uids(lore) == ["character#3", "character#2"]


def test_budget_stops_at_first_entry_that_does_not_fit() -> None:
    entries = [
        entry(1, ["key"], priority=9, content="one two three four five"),
        entry(2, ["key"], priority=5, content="six"),
    ]
    lore = scan(entries, ["key"], token_budget=3)
    assert uids(lore) == []
    assert lore.dropped_uids == ("character#1", "character#2")


def test_budget_keeps_constants_before_keyed_entries() -> None:
    entries = [entry(1, ["key"], priority=100), entry(2, constant=True, priority=0)]
    assert uids(scan(entries, ["key"], token_budget=2)) == ["character#2"]


def test_book_token_budget_applies() -> None:
    entries = [entry(i, ["key"], priority=i) for i in range(1, 4)]
    assert uids(scan(entries, ["key"], book={"token_budget": 2})) == ["character#3"]


# --- recursion ----------------------------------------------------------------------------


def chain() -> list[LorebookEntry]:
    return [
        entry(1, ["alpha"], content="mentions beta"),
        entry(2, ["beta"], content="mentions gamma"),
        entry(3, ["gamma"], content="mentions delta"),
        entry(4, ["delta"], content="end"),
    ]


def test_recursive_scanning_follows_activated_content() -> None:
    lore = scan(chain(), ["alpha"])
    assert uids(lore) == [f"character#{i}" for i in range(1, 5)]
    assert [e.recursion_round for e in lore.entries] == [0, 1, 2, 3]


def test_recursion_depth_limit() -> None:
    assert uids(scan(chain(), ["alpha"], max_recursion_depth=1)) == ["character#1", "character#2"]
    assert uids(scan(chain(), ["alpha"], max_recursion_depth=0)) == ["character#1"]


def test_book_can_turn_recursion_off() -> None:
    lore = scan(chain(), ["alpha"], book={"recursive_scanning": False})
    assert uids(lore) == ["character#1"]


def test_exclude_and_prevent_recursion() -> None:
    entries = chain()
    entries[1] = entry(
        2, ["beta"], content="mentions gamma", extensions={"exclude_recursion": True}
    )
    assert uids(scan(entries, ["alpha"])) == ["character#1"]
    entries = chain()
    entries[0] = entry(
        1, ["alpha"], content="mentions beta", extensions={"prevent_recursion": True}
    )
    assert uids(scan(entries, ["alpha"])) == ["character#1"]


def test_recursion_can_satisfy_secondary_keys() -> None:
    entries = [
        entry(1, ["castle"], content="the king rules"),
        entry(2, ["castle"], secondary_keys=["king"], selective=True),
    ]
    assert uids(scan(entries, ["castle"])) == ["character#1", "character#2"]


# --- positions ----------------------------------------------------------------------------


def test_positions_from_fields_and_extensions() -> None:
    entries = [
        entry(1, constant=True, position="before_char"),
        entry(2, constant=True),  # no position: after the character, as V2 readers do
        entry(3, constant=True, extensions={"position": 4, "depth": 2, "role": 1}),
        entry(4, constant=True, extensions={"position": 5}),
        entry(5, constant=True, extensions={"position": 6}),
        entry(6, constant=True, position="after_char", extensions={"position": 0}),
    ]
    lore = scan(entries, [])
    assert [e.uid for e in lore.before_char] == ["character#1", "character#6"]
    assert [e.uid for e in lore.after_char] == ["character#2"]
    assert [e.uid for e in lore.before_examples] == ["character#4"]
    assert [e.uid for e in lore.after_examples] == ["character#5"]
    (at_depth,) = lore.at_depth
    assert (at_depth.uid, at_depth.depth, at_depth.role) == ("character#3", 2, "user")
    assert lore.at(LorePosition.AT_DEPTH) == lore.at_depth


def test_at_depth_defaults_to_depth_four_as_system() -> None:
    (at_depth,) = scan([entry(1, constant=True, extensions={"position": 4})], []).at_depth
    assert (at_depth.depth, at_depth.role) == (4, "system")


# --- stacking and caching -----------------------------------------------------------------


def test_character_book_stacks_with_world_books_and_wins_ties() -> None:
    character = Lorebook(entries=[entry(1, ["key"], content="character lore")])
    world = Lorebook(name="atlas", entries=[entry(1, ["key"], content="world lore")])
    scanner = LoreScanner(character, [world], ScanSettings(token_budget=2))
    lore = scanner.scan(["key"], turn=0, counter=WordTokenCounter())
    assert uids(lore) == ["character#1"]
    assert lore.dropped_uids == ("atlas#1",)
    both = LoreScanner(character, [world]).scan(["key"], turn=0)
    assert uids(both) == ["character#1", "atlas#1"]


def test_character_book_budget_takes_precedence() -> None:
    character = Lorebook(token_budget=2, entries=[entry(1, ["key"])])
    world = Lorebook(token_budget=100, entries=[entry(2, ["key"])])
    assert LoreScanner(character, [world]).token_budget == 2
    assert LoreScanner(None, [world]).token_budget == 100


def test_world_books_get_unique_labels() -> None:
    books = [Lorebook(name="w", entries=[entry(1, constant=True)]) for _ in range(2)]
    assert uids(LoreScanner(None, books).scan([], turn=0)) == ["w#1", "w@2#1"]


def test_only_character_book_constants_are_stable() -> None:
    character = Lorebook(entries=[entry(1, constant=True), entry(2, ["k"])])
    world = Lorebook(name="w", entries=[entry(3, constant=True)])
    lore = LoreScanner(character, [world]).scan(["k"], turn=0)
    assert {e.uid: e.stable for e in lore.entries} == {
        "character#1": True,
        "character#2": False,
        "w#3": False,
    }


def test_scanner_cache_reuses_compiled_books() -> None:
    cache = ScannerCache(max_entries=2)
    book = Lorebook(entries=[entry(1, ["k"])])
    assert cache.get(book) is cache.get(book)
    assert cache.get(book) is not cache.get(Lorebook(entries=[entry(1, ["k"])]))


def test_same_inputs_give_identical_results() -> None:
    entries = [*chain(), entry(9, ["alpha"], secondary_keys=["beta"], selective=True)]
    assert scan(entries, ["alpha beta"]) == scan(entries, ["alpha beta"])


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="max_recursion_depth"):
        ScanSettings(max_recursion_depth=-1)
    with pytest.raises(ValueError, match="token_budget"):
        ScanSettings(token_budget=-5)
