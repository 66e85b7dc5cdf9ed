"""Prompt assembly: golden message list, sections, budgets, trimming, determinism."""

from __future__ import annotations

from datetime import datetime

import pytest

from talkloop.characters.lorebook import EntryDefaults, ScanSettings
from talkloop.characters.model import Character, Lorebook, LorebookEntry
from talkloop.characters.persona import Persona
from talkloop.characters.prompt import (
    AssembledPrompt,
    ChatMessage,
    HistoryMessage,
    PromptAssembler,
    PromptBudgetError,
    PromptRequest,
    PromptSettings,
    SectionBudgets,
    parse_examples,
    truncate_to_tokens,
)
from talkloop.characters.tokens import WordTokenCounter

COUNTER = WordTokenCounter()


def aria(**changes: object) -> Character:
    book = Lorebook(
        entries=[
            LorebookEntry(
                id=1, constant=True, position="before_char", content="Gull Rock is bare."
            ),
            LorebookEntry(id=2, keys=["storm"], content="Storms here last three days."),
            LorebookEntry(id=3, keys=["rain"], content="@@depth 1\nRain means {{user}} stays."),
        ]
    )
    fields: dict[str, object] = {
        "name": "Aria",
        "description": "Aria keeps the lighthouse and knows {{user}} from the village.",
        "personality": "calm, dry humour",
        "scenario": "A stormy night at the lighthouse.",
        "mes_example": (
            "<START>\n{{user}}: Is the lamp lit?\n{{char}}: Always.\n"
            "<start>\n{{user}}: Cold out.\n{{char}}: Tea's on."
        ),
        "system_prompt": "{{original}} Keep replies short.",
        "post_history_instructions": "Reply as {{char}} only.",
        "character_book": book,
    }
    fields.update(changes)
    return Character.model_validate(fields)


HISTORY = (
    HistoryMessage("assistant", "Evening. Come in out of the rain."),
    HistoryMessage("user", "Is the storm getting worse?"),
)
SAM = Persona("Sam", "A fisherman with a bad knee.")


def assemble(
    request: PromptRequest | None = None, settings: PromptSettings | None = None
) -> AssembledPrompt:
    assembler = PromptAssembler(settings, COUNTER, clock=lambda: datetime(2025, 1, 5, 9, 30))
    return assembler.assemble(request or PromptRequest(aria(), HISTORY, SAM, conversation_id="c1"))


def test_golden_message_list() -> None:
    prompt = assemble()
    assert prompt.messages == (
        ChatMessage(
            "system",
            "Write Aria's next reply in a fictional chat between Aria and User. "
            "Stay in character. Keep replies short.",
        ),
        ChatMessage(
            "system",
            "Gull Rock is bare.\n\n"
            "Aria keeps the lighthouse and knows User from the village.\n\n"
            "Aria's personality: calm, dry humour\n\n"
            "Scenario: A stormy night at the lighthouse.",
        ),
        ChatMessage(
            "system",
            "Example dialogue:\nUser: Is the lamp lit?\nAria: Always.\n\n"
            "Example dialogue:\nUser: Cold out.\nAria: Tea's on.",
        ),
        ChatMessage("system", "User's name is Sam.\nSam's persona: A fisherman with a bad knee."),
        ChatMessage("assistant", "Evening. Come in out of the rain."),
        ChatMessage("system", "Rain means Sam stays."),
        ChatMessage("user", "Is the storm getting worse?"),
        ChatMessage("system", "Storms here last three days."),
        ChatMessage("system", "Reply as Aria only."),
    )
    assert prompt.stable_prefix_messages == 3
    assert prompt.lore_uids == ("character#1", "character#2", "character#3")
    assert (prompt.num_trimmed_turns, prompt.summary_index) == (0, None)


def test_section_tokens_add_up() -> None:
    prompt = assemble()
    tokens = prompt.section_tokens
    assert tokens.lore == COUNTER.count("Rain means Sam stays.") + COUNTER.count(
        "Storms here last three days."
    )
    assert tokens.history == sum(COUNTER.count(m.content) for m in HISTORY)
    assert tokens.memory == 0
    assert tokens.overhead == 4 * len(prompt.messages)
    expected = sum(COUNTER.count(m.content) for m in prompt.messages) + tokens.overhead
    assert prompt.num_tokens == tokens.total == expected


def test_memory_slot_goes_after_history_before_lore() -> None:
    request = PromptRequest(aria(), HISTORY, SAM, memory="Sam lost a boat last year.")
    messages = assemble(request).messages
    assert [m.content for m in messages[-3:]] == [
        "Sam lost a boat last year.",
        "Storms here last three days.",
        "Reply as Aria only.",
    ]


def test_card_without_optional_fields() -> None:
    plain = Character(name="Bo", description="Bo is a cat.")
    prompt = assemble(PromptRequest(plain, (HistoryMessage("user", "hi"),), Persona("User")))
    assert prompt.as_dicts() == [
        {
            "role": "system",
            "content": "Write Bo's next reply in a fictional chat between Bo and User. "
            "Stay in character.",
        },
        {"role": "system", "content": "Bo is a cat."},
        {"role": "user", "content": "hi"},
    ]
    assert prompt.stable_prefix_messages == 2


def test_nickname_is_char_and_original_in_post_history() -> None:
    character = aria(nickname="Ari", post_history_instructions="{{original}} Be brief, {{char}}.")
    settings = PromptSettings(default_post_history_instructions="No narration for {{user}}.")
    messages = assemble(PromptRequest(character, HISTORY, SAM), settings).messages
    assert messages[-1].content == "No narration for Sam. Be brief, Ari."


def test_shared_user_name_none_renders_the_real_user_in_the_prefix() -> None:
    prompt = assemble(settings=PromptSettings(shared_user_name=None))
    assert "knows Sam from the village" in prompt.messages[1].content
    assert prompt.messages[3].content == "Sam's persona: A fisherman with a bad knee."


def test_world_book_constants_stay_out_of_the_stable_prefix() -> None:
    world = Lorebook(name="w", entries=[LorebookEntry(id=1, constant=True, content="World fact.")])
    prompt = assemble(PromptRequest(aria(), HISTORY, SAM, world_books=[world]))
    stable = prompt.messages[: prompt.stable_prefix_messages]
    assert all("World fact." not in m.content for m in stable)
    assert prompt.messages[-2].content == "Storms here last three days.\nWorld fact."


def test_parse_examples() -> None:
    assert parse_examples("<START>\na\n<start>\n\n<START>b\n") == ["a", "b"]
    assert parse_examples("no blocks, one example") == ["no blocks, one example"]
    assert parse_examples("") == []


# --- budgets and trimming -----------------------------------------------------------------


def test_truncate_to_tokens_cuts_after_a_whole_word() -> None:
    assert truncate_to_tokens("one two three four", 2, COUNTER) == "one two"
    assert truncate_to_tokens("one two", 5, COUNTER) == "one two"
    assert truncate_to_tokens("one two", 0, COUNTER) == ""


def test_section_budgets_cut_text_and_drop_example_blocks() -> None:
    budgets = SectionBudgets(system_tokens=4, examples_tokens=14, post_history_tokens=2)
    prompt = assemble(settings=PromptSettings(budgets=budgets))
    assert prompt.messages[0].content == "Write Aria's"
    assert prompt.messages[2].content == "Example dialogue:\nUser: Is the lamp lit?\nAria: Always."
    assert prompt.messages[-1].content == "Reply as"


def test_lore_budget_section_caps_lore() -> None:
    settings = PromptSettings(budgets=SectionBudgets(lore_tokens=5))
    prompt = assemble(settings=settings)
    assert prompt.lore_uids == ("character#1",)


def long_history(num_turns: int) -> tuple[HistoryMessage, ...]:
    messages = [HistoryMessage("assistant", "Welcome.")]
    for turn in range(num_turns):
        messages += [
            HistoryMessage("user", f"question {turn} " + "word " * 8),
            HistoryMessage("assistant", f"answer {turn} " + "word " * 8),
        ]
    return tuple(messages)


def trimmed(num_turns: int, **settings: object) -> AssembledPrompt:
    base: dict[str, object] = {"context_tokens": 300, "reply_reserve_tokens": 50}
    base.update(settings)
    request = PromptRequest(aria(character_book=None), long_history(num_turns), SAM)
    return assemble(request, PromptSettings(**base))  # type: ignore[arg-type]


def test_history_trims_oldest_turns_and_leaves_a_marker() -> None:
    prompt = trimmed(12)
    assert prompt.num_trimmed_turns > 0
    assert prompt.summary_index == 4
    marker = prompt.messages[prompt.summary_index]
    assert marker == ChatMessage("system", "[Earlier messages are not shown.]")
    first_kept = prompt.messages[prompt.summary_index + 1]
    assert first_kept.role == "user"
    assert first_kept.content.startswith(f"question {prompt.num_trimmed_turns - 1} ")
    assert prompt.messages[-2].content.startswith("answer 11 ")
    assert prompt.num_tokens <= 250


def test_trimming_keeps_as_many_turns_as_fit() -> None:
    prompt = trimmed(12)
    one_more = trimmed(12, context_tokens=300 + 40)
    assert one_more.num_trimmed_turns < prompt.num_trimmed_turns


def test_untrimmed_history_has_no_marker() -> None:
    prompt = trimmed(2)
    assert (prompt.num_trimmed_turns, prompt.summary_index) == (0, None)


def test_trim_step_trims_in_whole_steps() -> None:
    counts = [trimmed(n, trim_step_turns=4).num_trimmed_turns for n in range(8, 16)]
    assert all(count % 4 == 0 for count in counts)
    assert any(count > 0 for count in counts)


def test_prompt_that_cannot_fit_names_the_numbers() -> None:
    with pytest.raises(PromptBudgetError, match=r"context_tokens - reply_reserve_tokens = 50"):
        trimmed(3, context_tokens=100)


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="must exceed reply_reserve_tokens"):
        PromptSettings(context_tokens=100, reply_reserve_tokens=100)
    with pytest.raises(ValueError, match="trim_step_turns"):
        PromptSettings(trim_step_turns=0)
    with pytest.raises(ValueError, match=r"SectionBudgets\.lore_tokens"):
        SectionBudgets(lore_tokens=-1)
    with pytest.raises(ValueError, match="history role"):
        HistoryMessage("narrator", "x")  # type: ignore[arg-type]


# --- determinism --------------------------------------------------------------------------


def test_identical_requests_give_identical_prompts() -> None:
    character = aria(description="{{random:a,b,c,d,e,f}} {{pick:g,h,i,j}} {{roll:d100}}")
    request = PromptRequest(character, HISTORY, SAM, conversation_id="c9", seed=3)
    assert assemble(request) == assemble(request)
    fresh = PromptAssembler(None, COUNTER, clock=lambda: datetime(2025, 1, 5, 9, 30))
    assert fresh.assemble(request) == assemble(request)


def test_turn_defaults_to_assistant_messages_for_lore_timing() -> None:
    entry = LorebookEntry(id=9, constant=True, content="@@activate_only_after 2\nLate lore.")
    character = aria(character_book=Lorebook(entries=[entry]))
    early = assemble(PromptRequest(character, HISTORY, SAM))
    assert early.lore_uids == ()
    assert assemble(PromptRequest(character, HISTORY, SAM, turn=2)).lore_uids == ("character#9",)
    late_history = (*HISTORY, HistoryMessage("assistant", "Yes."), HistoryMessage("user", "Ok."))
    assert assemble(PromptRequest(character, late_history, SAM)).lore_uids == ("character#9",)


def test_lore_scan_settings_apply() -> None:
    settings = PromptSettings(lore=ScanSettings(EntryDefaults(scan_depth=1)))
    assert assemble(settings=settings).lore_uids == ("character#1", "character#2")
