"""Macros: each one, case-insensitivity, unknown macros left alone, determinism."""

from __future__ import annotations

from datetime import datetime

import pytest

from talkloop.characters.macros import (
    DiceRoll,
    MacroCall,
    MacroContext,
    MacroEngine,
    render_macros,
)

FIXED = datetime(2025, 1, 5, 15, 7)


def ctx(**overrides: object) -> MacroContext:
    base: dict[str, object] = {
        "char": "Aria",
        "user": "Sam",
        "original": "Default system prompt.",
        "conversation_id": "conv-1",
        "seed": 7,
        "clock": lambda: FIXED,
    }
    base.update(overrides)
    return MacroContext(**base)  # type: ignore[arg-type]


def test_char_and_user() -> None:
    assert render_macros("{{char}} greets {{user}}.", ctx()) == "Aria greets Sam."


def test_names_are_case_insensitive() -> None:
    assert render_macros("{{CHAR}} {{User}} {{ char }}", ctx()) == "Aria Sam Aria"


def test_angle_bracket_forms() -> None:
    assert render_macros("<BOT> and <USER>, <bot>/<user>", ctx()) == "Aria and Sam, Aria/Sam"


def test_original() -> None:
    text = "{{original}}\nStay in character."
    assert render_macros(text, ctx()) == "Default system prompt.\nStay in character."


def test_comments_are_removed_even_across_lines() -> None:
    assert render_macros("a{{// note}}b{{//two\nlines}}c", ctx()) == "abc"


def test_unknown_macros_are_left_as_is() -> None:
    text = "{{mystery}} {{char:extra}} {{}} {{ 42 }} <other>"
    assert render_macros(text, ctx()) == text


def test_values_are_not_rescanned() -> None:
    assert render_macros("{{user}}", ctx(user="{{char}}")) == "{{char}}"


def test_random_comma_form_picks_a_listed_value() -> None:
    out = render_macros("{{random:red, green ,blue}}", ctx())
    assert out in {"red", "green", "blue"}


def test_random_double_colon_form_keeps_commas() -> None:
    out = render_macros("{{random::a, b::c, d}}", ctx())
    assert out in {"a, b", "c, d"}


def test_random_escaped_comma() -> None:
    out = render_macros(r"{{random:x\,y}}", ctx())
    assert out == "x,y"


def test_random_is_deterministic_for_a_seed_and_varies_with_it() -> None:
    text = "{{random:" + ",".join(str(i) for i in range(100)) + "}}"
    assert render_macros(text, ctx(seed=1)) == render_macros(text, ctx(seed=1))
    outs = {render_macros(text, ctx(seed=seed)) for seed in range(20)}
    assert len(outs) > 5


def test_pick_is_stable_per_conversation_across_seeds() -> None:
    text = "{{pick:" + ",".join(str(i) for i in range(100)) + "}}"
    outs = {render_macros(text, ctx(seed=seed)) for seed in range(20)}
    assert len(outs) == 1
    others = {render_macros(text, ctx(conversation_id=f"c{i}")) for i in range(20)}
    assert len(others) > 5


def test_pick_depends_on_position() -> None:
    options = ",".join(str(i) for i in range(1000))
    text = " ".join(["{{pick:" + options + "}}"] * 10)
    assert len(set(render_macros(text, ctx()).split())) > 1


@pytest.mark.parametrize(
    ("spec", "low", "high"),
    [("1d20", 1, 20), ("d6", 1, 6), ("2d6+1", 3, 13), ("6", 1, 6), ("3d4-2", 1, 10)],
)
def test_roll_stays_in_range(spec: str, low: int, high: int) -> None:
    results = {int(render_macros("{{roll:" + spec + "}}", ctx(seed=s))) for s in range(200)}
    assert min(results) >= low and max(results) <= high
    assert len(results) > 1


def test_roll_space_form_and_determinism() -> None:
    for text in ("{{roll 2d6}}", "{{ROLL:2D6}}"):
        assert 2 <= int(render_macros(text, ctx())) <= 12
        assert render_macros(text, ctx()) == render_macros(text, ctx())


@pytest.mark.parametrize("spec", ["abc", "0d6", "1d0", "2d6*3", "5000d6", ""])
def test_bad_roll_is_left_as_is(spec: str) -> None:
    text = "{{roll:" + spec + "}}"
    assert render_macros(text, ctx()) == text


def test_dice_parse() -> None:
    assert DiceRoll.parse("2d6+1") == DiceRoll(2, 6, 1)
    assert DiceRoll.parse(" d20 ") == DiceRoll(1, 20, 0)
    assert DiceRoll.parse("8") == DiceRoll(1, 8, 0)


def test_time_and_date_from_injected_clock() -> None:
    assert render_macros("{{time}} on {{date}}", ctx()) == "3:07 PM on January 5, 2025"
    midnight = ctx(clock=lambda: datetime(2024, 2, 29, 0, 5))
    assert render_macros("{{time}} {{weekday}} {{isodate}}", midnight) == (
        "12:05 AM Thursday 2024-02-29"
    )


def test_custom_handler_through_registry() -> None:
    def shout(call: MacroCall, context: MacroContext) -> str:
        return " ".join(call.args).upper()

    engine = MacroEngine().with_handler("shout", shout)
    assert engine.render("{{Shout:hi}} {{char}}", ctx()) == "HI Aria"
    assert "shout" in engine.names


def test_text_without_macros_is_returned_unchanged() -> None:
    text = "plain text, no braces"
    assert render_macros(text, ctx()) is text
