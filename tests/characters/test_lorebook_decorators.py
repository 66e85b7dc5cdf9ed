"""V3 decorators: parsing (fallbacks, repeats, stripping) and each decorator's effect."""

from __future__ import annotations

import pytest

from talkloop.characters.lorebook import (
    ActivatedLore,
    Decorators,
    LorePosition,
    LoreScanner,
    parse_decorators,
)
from talkloop.characters.model import Lorebook, LorebookEntry


def scan_one(
    content: str, messages: list[str], *, turn: int = 0, **fields: object
) -> ActivatedLore:
    book = Lorebook(entries=[LorebookEntry(id=1, content=content, **fields)])  # type: ignore[arg-type]
    return LoreScanner(book).scan(messages, turn=turn)


def active(content: str, messages: list[str], **kwargs: object) -> bool:
    return bool(scan_one(content, messages, **kwargs).entries)  # type: ignore[arg-type]


# --- parsing ------------------------------------------------------------------------------


def test_decorators_are_parsed_and_stripped() -> None:
    parsed = parse_decorators("@@depth 3\n@@role assistant\n\nThe lore itself.\nLine two.")
    assert parsed.decorators == Decorators(depth=3, role="assistant")
    assert parsed.content == "The lore itself.\nLine two."


def test_content_without_decorators_is_untouched() -> None:
    text = "No decorators here, even with @@ inside."
    assert parse_decorators(text).content == text
    assert parse_decorators(text).decorators == Decorators()


def test_unknown_and_invalid_decorators_are_ignored() -> None:
    parsed = parse_decorators("@@sparkle 5\n@@depth deep\n@@role narrator\ntext")
    assert parsed.decorators.depth is None and parsed.decorators.role is None
    assert parsed.decorators.ignored == ("sparkle", "depth", "role")
    assert parsed.content == "text"


def test_first_occurrence_of_a_name_wins() -> None:
    assert parse_decorators("@@depth 2\n@@depth 7\nx").decorators.depth == 2


def test_fallback_applies_only_when_primary_is_ignored() -> None:
    unknown_first = parse_decorators("@@risu_only 4\n@@@activate_only_after 4\nx")
    assert unknown_first.decorators.activate_only_after == 4
    known_first = parse_decorators("@@depth 5\n@@@scan_depth 9\nx")
    assert known_first.decorators == Decorators(depth=5)


def test_fallback_chain_takes_first_recognised() -> None:
    text = "@@risu 1\n@@@agn 2\n@@@activate_only_every 3\n@@@activate_only_every 4\nx"
    assert parse_decorators(text).decorators.activate_only_every == 3


def test_key_list_decorators_split_on_commas() -> None:
    parsed = parse_decorators("@@additional_keys sword, shield ,\n@@exclude_keys peace\nx")
    assert parsed.decorators.additional_keys == ("sword", "shield")
    assert parsed.decorators.exclude_keys == ("peace",)


# --- effects ------------------------------------------------------------------------------


def test_depth_decorator_places_at_depth() -> None:
    (hit,) = scan_one("@@depth 1\nlore", [], constant=True).at_depth
    assert (hit.depth, hit.role, hit.content) == (1, "system", "lore")


def test_negative_depth_means_after_the_last_message() -> None:
    (hit,) = scan_one("@@depth -2\nlore", [], constant=True).at_depth
    assert hit.depth == 0


def test_position_decorator_wins_over_depth_and_fields() -> None:
    lore = scan_one("@@position before_desc\n@@depth 3\nlore", [], constant=True)
    assert [e.position for e in lore.entries] == [LorePosition.BEFORE_CHAR]
    lore = scan_one("@@position after_desc\nlore", [], constant=True, position="before_char")
    assert [e.position for e in lore.entries] == [LorePosition.AFTER_CHAR]


def test_unsupported_position_value_is_ignored() -> None:
    lore = scan_one("@@position personality\nlore", [], constant=True, position="before_char")
    assert [e.position for e in lore.entries] == [LorePosition.BEFORE_CHAR]


def test_role_decorator() -> None:
    (hit,) = scan_one("@@depth 0\n@@role user\nlore", [], constant=True).at_depth
    assert hit.role == "user"


@pytest.mark.parametrize(("turn", "expected"), [(0, False), (2, False), (3, True), (9, True)])
def test_activate_only_after(turn: int, expected: bool) -> None:
    assert active("@@activate_only_after 3\nlore", [], turn=turn, constant=True) is expected


@pytest.mark.parametrize(("turn", "expected"), [(0, True), (1, False), (2, False), (3, True)])
def test_activate_only_every(turn: int, expected: bool) -> None:
    assert active("@@activate_only_every 3\nlore", [], turn=turn, constant=True) is expected


def test_timing_decorators_also_gate_keyed_entries() -> None:
    content = "@@activate_only_after 2\nlore"
    assert not active(content, ["dragon"], turn=1, keys=["dragon"])
    assert active(content, ["dragon"], turn=2, keys=["dragon"])


def test_timed_constants_are_not_stable() -> None:
    (hit,) = scan_one("@@activate_only_every 1\nlore", [], constant=True).entries
    assert hit.keyless and not hit.stable


def test_dont_activate_blocks_even_matching_and_constant_entries() -> None:
    assert not active("@@dont_activate\nlore", ["dragon"], keys=["dragon"], constant=True)


def test_activate_forces_activation_and_beats_dont_activate() -> None:
    assert active("@@activate\nlore", [], keys=["dragon"])
    assert active("@@dont_activate\n@@activate\nlore", [], keys=["dragon"])


def test_scan_depth_decorator_overrides_book() -> None:
    messages = ["dragon", "x", "x", "x"]
    assert not active("lore", messages, keys=["dragon"])
    assert active("@@scan_depth 4\nlore", messages, keys=["dragon"])
    assert not active("@@scan_depth 0\nlore", ["dragon"], keys=["dragon"])


def test_additional_keys_require_one_of_them() -> None:
    content = "@@additional_keys sword,shield\nlore"
    assert not active(content, ["a knight"], keys=["knight"])
    assert active(content, ["a knight with a shield"], keys=["knight"])


def test_exclude_keys_block_activation() -> None:
    content = "@@exclude_keys peace\nlore"
    assert active(content, ["war"], keys=["war"])
    assert not active(content, ["war and peace"], keys=["war"])
