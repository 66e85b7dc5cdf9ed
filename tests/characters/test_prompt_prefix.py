"""Prefix stability: rendered through a ChatML-style template and a byte-level tokenizer,
consecutive turns and different users of one character share the expected token prefix."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from talkloop.characters.model import Character, Lorebook, LorebookEntry
from talkloop.characters.persona import Persona
from talkloop.characters.prompt import (
    AssembledPrompt,
    ChatMessage,
    HistoryMessage,
    PromptAssembler,
    PromptRequest,
    PromptSettings,
)


class ByteTokenizer:
    """One token per UTF-8 byte: any prefix of the bytes is a prefix of the tokens."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def count(self, text: str) -> int:
        return len(text.encode("utf-8"))


TOKENIZER = ByteTokenizer()


def render(messages: Sequence[ChatMessage]) -> list[int]:
    text = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return TOKENIZER.encode(text)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


CHARACTER = Character(
    name="Vell",
    description="Vell runs the ferry and owes {{user}} a favour. Mood: {{random:wry,tired}}.",
    personality="{{pick:terse,curt}}",
    scenario="Fog on the river; the bell rings {{roll:d6}} times.",
    mes_example="<START>\n{{user}}: Crossing?\n{{char}}: Two coins.",
    character_book=Lorebook(
        entries=[
            LorebookEntry(id=1, constant=True, content="The river is wide. {{user}} knows it."),
            LorebookEntry(id=2, keys=["bridge"], content="The bridge fell years ago."),
            LorebookEntry(id=3, keys=["coin"], content="@@depth 2\nCoins are silver."),
            LorebookEntry(id=4, constant=True, content="@@activate_only_every 2\nBell lore."),
        ]
    ),
)
WORLD = Lorebook(name="delta", entries=[LorebookEntry(id=1, constant=True, content="Delta fact.")])
TURN_1 = (
    HistoryMessage("assistant", "Fog's thick tonight."),
    HistoryMessage("user", "Is there a bridge?"),
)
TURN_2 = (*TURN_1, HistoryMessage("assistant", "Not anymore."), HistoryMessage("user", "Fine."))


def assemble(request: PromptRequest, settings: PromptSettings | None = None) -> AssembledPrompt:
    clock = lambda: datetime(2025, 3, 1, 20, 0)  # noqa: E731
    return PromptAssembler(settings, TOKENIZER, clock=clock).assemble(request)


def request(history: Sequence[HistoryMessage], **changes: object) -> PromptRequest:
    fields: dict[str, object] = {
        "character": CHARACTER,
        "history": history,
        "persona": Persona("Sam", "A courier."),
        "conversation_id": "conv-sam",
        "seed": len(history),
    }
    fields.update(changes)
    return PromptRequest(**fields)  # type: ignore[arg-type]


def stable_tokens(prompt: AssembledPrompt) -> list[int]:
    return render(prompt.messages[: prompt.stable_prefix_messages])


def test_consecutive_turns_share_prefix_and_history() -> None:
    first = assemble(request(TURN_1, memory="Sam paid last time."))
    second = assemble(request(TURN_2, memory="Sam is in a hurry."))
    assert first.stable_prefix_messages == second.stable_prefix_messages == 3
    prefix = stable_tokens(first)
    assert prefix == stable_tokens(second)
    assert render(first.messages)[: len(prefix)] == prefix
    assert render(second.messages)[: len(prefix)] == prefix
    # Per-turn parts come after the history: turn 2 reuses turn 1 up to its last user message.
    last_user = max(i for i, m in enumerate(first.messages) if m.role == "user")
    through_history = render(first.messages[: last_user + 1])
    assert common_prefix(render(first.messages), render(second.messages)) >= len(through_history)
    # ...and what follows the history differs between the turns.
    assert first.messages[last_user + 1 :] != second.messages[last_user + 3 :]


def test_turn_gated_and_triggered_lore_stay_out_of_the_prefix() -> None:
    first = assemble(request(TURN_1))
    second = assemble(request(TURN_2))
    assert "character#4" not in first.lore_uids and "character#4" in second.lore_uids
    assert "character#2" in first.lore_uids
    for prompt in (first, second):
        prefix_text = "".join(m.content for m in prompt.messages[: prompt.stable_prefix_messages])
        assert "Bell lore." not in prefix_text and "bridge fell" not in prefix_text
        assert "The river is wide. User knows it." in prefix_text


def test_two_users_of_one_character_share_the_prefix() -> None:
    sam = assemble(request(TURN_1, world_books=[WORLD]))
    kim = assemble(
        request(
            (HistoryMessage("user", "Take me across, coin ready."),),
            persona=Persona("Kim", "A botanist."),
            conversation_id="conv-kim",
            seed=99,
        )
    )
    prefix = stable_tokens(sam)
    assert prefix == stable_tokens(kim)
    divergence = common_prefix(render(sam.messages), render(kim.messages))
    assert len(prefix) <= divergence < len(render(sam.messages[: sam.stable_prefix_messages + 1]))
    assert "Delta fact." in sam.messages[-1].content or "Delta fact." in sam.messages[-2].content


def test_per_user_prefix_when_shared_user_name_is_off() -> None:
    settings = PromptSettings(shared_user_name=None)
    sam = assemble(request(TURN_1), settings)
    kim = assemble(request(TURN_1, persona=Persona("Kim")), settings)
    assert stable_tokens(sam) != stable_tokens(kim)


def test_prompt_is_byte_identical_for_identical_requests() -> None:
    assert render(assemble(request(TURN_2)).messages) == render(assemble(request(TURN_2)).messages)
