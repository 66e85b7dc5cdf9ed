"""Conversation trees: swipes, regenerate, edits, branches, deletes, events and persistence."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from talkloop.characters.conversation import (
    Branched,
    Conversation,
    ConversationError,
    HeadMoved,
    Message,
    MessageAdded,
    MessageDeleted,
    MessageEdited,
    PersonaChanged,
    Regenerated,
    SwipeChosen,
    greetings_for,
)
from talkloop.characters.errors import CharacterError
from talkloop.characters.model import Character
from talkloop.characters.persona import Persona, PersonaError

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    """Each call returns the next second after T0."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> datetime:
        self.calls += 1
        return T0 + timedelta(seconds=self.calls)


def counter_ids(prefix: str = "m") -> Callable[[], str]:
    numbers: Iterator[int] = iter(range(1, 10_000))
    return lambda: f"{prefix}{next(numbers)}"


def at(second: int) -> datetime:
    return T0 + timedelta(seconds=second)


def make_conversation(*, group: bool = False) -> Conversation:
    return Conversation(
        persona=Persona("Sam", "a night-shift nurse"),
        group=group,
        clock=FakeClock(),
        id_factory=counter_ids(),
        conversation_id="c1",
    )


ADA = Character(
    name="Ada",
    first_mes="Hello, {{user}}.",
    alternate_greetings=["Oh! A visitor.", "You're late."],
    group_only_greetings=["Hello, everyone."],
)


def contents(conversation: Conversation) -> list[str]:
    return [message.content for message in conversation.active_path()]


def three_turns() -> Conversation:
    """m1 greeting (3 swipes), m2 user, m3 assistant."""
    conversation = make_conversation()
    conversation.greet(ADA, character_id="ada")
    conversation.append("user", "Hi Ada.", author_name="Sam")
    conversation.append("assistant", "What brings you here?", author_name="Ada", character_id="ada")
    return conversation


def assert_unchanged(conversation: Conversation, action: Callable[[], Any], match: str) -> None:
    before = conversation.to_dict()
    with pytest.raises(ConversationError, match=match):
        action()
    assert conversation.to_dict() == before


# ------------------------------------------------------------------ greetings


def test_greeting_and_alternates_are_swipes_of_the_first_message() -> None:
    conversation = make_conversation()
    first = conversation.greet(ADA, character_id="ada")
    assert first.swipes == ("Hello, {{user}}.", "Oh! A visitor.", "You're late.")
    assert first.swipe_index == 0
    assert (first.role, first.author_name, first.character_id) == ("assistant", "Ada", "ada")
    assert first.parent_id is None
    assert conversation.active_path() == [first]
    assert conversation.events == (MessageAdded(at(1), "m1", None, "assistant"),)


def test_group_only_greetings_are_offered_in_groups_only() -> None:
    assert greetings_for(ADA, group=False) == ["Hello, {{user}}.", "Oh! A visitor.", "You're late."]
    group = make_conversation(group=True)
    first = group.greet(ADA)
    assert first.swipes[-1] == "Hello, everyone."
    assert len(first.swipes) == 4


def test_greeting_with_no_text_raises_and_changes_nothing() -> None:
    conversation = make_conversation()
    silent = Character(name="Mute", group_only_greetings=["only in groups"])
    assert_unchanged(conversation, lambda: conversation.greet(silent), "'Mute' has no greeting")


def test_choosing_an_alternate_greeting() -> None:
    conversation = make_conversation()
    first = conversation.greet(ADA)
    chosen = conversation.choose_swipe(first.id, 2)
    assert chosen.content == "You're late."
    assert contents(conversation) == ["You're late."]
    assert conversation.events[-1] == SwipeChosen(at(2), "m1", 0, 2)


# ------------------------------------------------------------------ swipes and regenerate


def test_regenerate_adds_a_swipe_and_chooses_it() -> None:
    conversation = three_turns()
    message = conversation.regenerate("m3", "Another late caller?")
    assert message.swipes == ("What brings you here?", "Another late caller?")
    assert message.swipe_index == 1
    assert contents(conversation)[-1] == "Another late caller?"
    assert conversation.events[-1] == Regenerated(at(4), "m3", 1)


def test_swiping_back_and_forth_records_each_choice() -> None:
    conversation = three_turns()
    conversation.regenerate("m3", "second")
    conversation.regenerate("m3", "third")
    conversation.choose_swipe("m3", 0)
    conversation.choose_swipe("m3", 0)  # already chosen: no event
    assert contents(conversation)[-1] == "What brings you here?"
    assert conversation.events[-3:] == (
        Regenerated(at(4), "m3", 1),
        Regenerated(at(5), "m3", 2),
        SwipeChosen(at(6), "m3", 2, 0),
    )


def test_swipe_index_out_of_range_raises_and_changes_nothing() -> None:
    conversation = three_turns()
    for bad in (3, -1):
        assert_unchanged(
            conversation,
            lambda bad=bad: conversation.choose_swipe("m1", bad),  # type: ignore[misc]
            rf"message 'm1' has 3 swipes \(indices 0..2\); got {bad}",
        )


def test_only_assistant_messages_regenerate() -> None:
    conversation = three_turns()
    assert_unchanged(
        conversation, lambda: conversation.regenerate("m2", "x"), "message 'm2' is 'user'"
    )


# ------------------------------------------------------------------ edits


def test_edit_keeps_the_original_text_editor_and_time() -> None:
    conversation = three_turns()
    edited = conversation.edit("m3", "What brings you here, so late?", editor="Sam")
    assert edited.content == "What brings you here, so late?"
    assert edited.edited_from == "What brings you here?"
    again = conversation.edit("m3", "Why are you here?", editor="moderator")
    assert again.edited_from == "What brings you here?"  # the original, not the last edit
    assert [(e.before, e.after, e.editor, e.edited_at) for e in again.edits] == [
        ("What brings you here?", "What brings you here, so late?", "Sam", at(4)),
        ("What brings you here, so late?", "Why are you here?", "moderator", at(5)),
    ]
    assert contents(conversation)[-1] == "Why are you here?"
    assert conversation.events[-1] == MessageEdited(
        at(5), "m3", 0, "What brings you here, so late?", "Why are you here?", "moderator"
    )


def test_edit_applies_to_the_chosen_swipe_only() -> None:
    conversation = three_turns()
    conversation.choose_swipe("m1", 1)
    edited = conversation.edit("m1", "Oh! A guest.", editor="Sam")
    assert edited.swipes == ("Hello, {{user}}.", "Oh! A guest.", "You're late.")
    assert edited.edited_from == "Oh! A visitor."
    assert conversation.choose_swipe("m1", 0).edited_from is None


def test_editing_a_missing_message_raises_and_changes_nothing() -> None:
    conversation = three_turns()
    assert_unchanged(
        conversation,
        lambda: conversation.edit("nope", "x", editor="Sam"),
        "conversation 'c1' has no message with id 'nope' \\(3 messages\\)",
    )
    assert_unchanged(conversation, lambda: conversation.edit("m2", "x", editor=" "), "editor")


# ------------------------------------------------------------------ branches


def test_branch_from_an_earlier_message_starts_a_new_path() -> None:
    conversation = three_turns()
    branch = conversation.branch("m1", "user", "Actually, goodbye.", author_name="Sam")
    assert branch.id == "m4"
    assert contents(conversation) == ["Hello, {{user}}.", "Actually, goodbye."]
    assert [m.id for m in conversation.children("m1")] == ["m2", "m4"]
    assert conversation.events[-1] == Branched(at(4), "m4", "m1")
    reply = conversation.append("assistant", "Already?", author_name="Ada")
    assert reply.parent_id == "m4"
    assert [m.id for m in conversation.active_path()] == ["m1", "m4", "m5"]


def test_checkout_switches_back_to_the_old_branch() -> None:
    conversation = three_turns()
    conversation.branch("m2", "assistant", "Welcome back.", author_name="Ada")
    conversation.checkout("m3")
    assert [m.id for m in conversation.active_path()] == ["m1", "m2", "m3"]
    assert conversation.events[-1] == HeadMoved(at(5), "m3", "m4")
    conversation.checkout(None)
    assert conversation.active_path() == []


def test_branching_from_a_missing_message_raises_and_changes_nothing() -> None:
    conversation = three_turns()
    assert_unchanged(
        conversation,
        lambda: conversation.branch("m9", "user", "x", author_name="Sam"),
        "no message with id 'm9'",
    )
    assert_unchanged(conversation, lambda: conversation.checkout("m9"), "'m9'")


# ------------------------------------------------------------------ delete


def test_delete_removes_the_subtree_and_moves_the_head_to_the_parent() -> None:
    conversation = three_turns()
    conversation.branch("m2", "assistant", "Welcome back.", author_name="Ada")  # m4
    deleted = conversation.delete("m2")
    assert deleted == ("m2", "m3", "m4")
    assert [m.id for m in conversation.messages] == ["m1"]
    assert [m.id for m in conversation.active_path()] == ["m1"]
    assert conversation.children("m1") == []
    assert conversation.events[-1] == MessageDeleted(at(5), "m2", ("m2", "m3", "m4"))


def test_delete_off_the_active_path_keeps_the_head() -> None:
    conversation = three_turns()
    conversation.branch("m2", "assistant", "Welcome back.", author_name="Ada")  # m4
    conversation.delete("m3")
    assert [m.id for m in conversation.active_path()] == ["m1", "m2", "m4"]
    conversation.delete("m1")
    assert len(conversation) == 0
    assert conversation.head_id is None


def test_deleting_a_missing_message_raises_and_changes_nothing() -> None:
    conversation = three_turns()
    assert_unchanged(conversation, lambda: conversation.delete("m3x"), "'m3x'")


def test_an_id_factory_repeating_an_id_is_refused() -> None:
    conversation = Conversation(clock=FakeClock(), id_factory=lambda: "same")
    conversation.append("user", "one", author_name="Sam")
    assert_unchanged(
        conversation,
        lambda: conversation.append("user", "two", author_name="Sam"),
        "id factory returned an id already in use: 'same'",
    )


def test_conversation_errors_are_character_errors() -> None:
    assert issubclass(ConversationError, CharacterError)


# ------------------------------------------------------------------ persona


def test_persona_is_held_and_changes_are_recorded() -> None:
    conversation = make_conversation()
    assert conversation.persona == Persona("Sam", "a night-shift nurse")
    conversation.set_persona(Persona("Samira"))
    assert conversation.persona.name == "Samira"
    assert conversation.events == (PersonaChanged(at(1), "Samira", ""),)


def test_persona_rejects_an_empty_name() -> None:
    with pytest.raises(PersonaError, match="persona name must be a non-empty string"):
        Persona("  ")
    assert issubclass(PersonaError, CharacterError) and issubclass(PersonaError, ValueError)


# ------------------------------------------------------------------ persistence


def busy_conversation() -> Conversation:
    conversation = three_turns()
    conversation.regenerate("m3", "Another late caller?")
    conversation.edit("m3", "Another late caller!", editor="Sam")
    conversation.branch("m1", "user", "Goodbye.", author_name="Sam")
    conversation.append(
        "assistant", "Farewell.", author_name="Ada", character_id="ada", metadata={"tokens": 3}
    )
    conversation.choose_swipe("m1", 1)
    conversation.delete("m2")
    conversation.set_persona(Persona("Sam", "now a day-shift nurse"))
    return conversation


def test_to_dict_from_dict_round_trip_through_json() -> None:
    conversation = busy_conversation()
    document = json.loads(json.dumps(conversation.to_dict()))
    loaded = Conversation.from_dict(document)
    assert loaded.to_dict() == conversation.to_dict()
    assert loaded.active_path() == conversation.active_path()
    assert loaded.events == conversation.events
    assert loaded.persona == conversation.persona
    assert loaded.get("m5").metadata == {"tokens": 3}


def test_a_loaded_conversation_keeps_working() -> None:
    loaded = Conversation.from_dict(
        busy_conversation().to_dict(), clock=FakeClock(), id_factory=counter_ids("n")
    )
    reply = loaded.append("user", "Wait!", author_name="Sam")
    assert (reply.id, reply.parent_id, reply.created_at) == ("n1", "m5", at(1))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: d.update(version=7), "format version 7 is not supported; expected 1"),
        (
            lambda d: d["messages"].reverse(),
            "'m5' names parent 'm4', which does not come before it",
        ),
        (lambda d: d["messages"][0].update(swipe_index=9), "has 3 swipes"),
        (lambda d: d["messages"][0].update(role="narrator"), "role must be one of"),
        (lambda d: d["messages"][0].pop("swipes"), "invalid conversation document"),
        (lambda d: d.update(head_id="ghost"), "no message with id 'ghost'"),
        (lambda d: d["events"][0].update(type="teleported"), "unknown conversation event type"),
        (lambda d: d["messages"].append(dict(d["messages"][0])), "duplicate message id 'm1'"),
    ],
)
def test_from_dict_rejects_damaged_documents(
    damage: Callable[[dict[str, Any]], None], match: str
) -> None:
    document = busy_conversation().to_dict()
    damage(document)
    with pytest.raises(ConversationError, match=match):
        Conversation.from_dict(document)


def test_message_dict_carries_the_simple_persisted_fields() -> None:
    message = three_turns().get("m1")
    data = message.to_dict()
    assert set(data) == {
        "id",
        "parent_id",
        "role",
        "author_name",
        "character_id",
        "content",
        "swipes",
        "swipe_index",
        "created_at",
        "edits",
        "metadata",
    }
    assert data["created_at"] == "2024-05-01T12:00:01+00:00"
    assert Message.from_dict(data) == message


# ------------------------------------------------------------------ properties

OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["append", "branch", "regenerate", "swipe", "edit", "delete", "checkout"]),
        st.integers(min_value=0, max_value=12),
        st.integers(min_value=-1, max_value=4),
    ),
    max_size=30,
)


def apply(conversation: Conversation, name: str, target: int, number: int) -> None:
    message_id = f"m{target}"
    actions: dict[str, Callable[[], object]] = {
        "append": lambda: conversation.append("assistant", f"t{number}", author_name="Ada"),
        "branch": lambda: conversation.branch(message_id, "user", "b", author_name="Sam"),
        "regenerate": lambda: conversation.regenerate(message_id, f"r{number}"),
        "swipe": lambda: conversation.choose_swipe(message_id, number),
        "edit": lambda: conversation.edit(message_id, f"e{number}", editor="Sam"),
        "delete": lambda: conversation.delete(message_id),
        "checkout": lambda: conversation.checkout(message_id),
    }
    actions[name]()


@settings(max_examples=150, deadline=None)
@given(OPERATIONS)
def test_any_operation_sequence_keeps_the_tree_consistent(
    operations: list[tuple[str, int, int]],
) -> None:
    conversation = make_conversation()
    for name, target, number in operations:
        before = conversation.to_dict()
        try:
            apply(conversation, name, target, number)
        except ConversationError:
            assert conversation.to_dict() == before
    path = conversation.active_path()
    assert all(child.parent_id == parent.id for parent, child in pairwise(path))
    assert (path[-1].id if path else None) == conversation.head_id
    assert Conversation.from_dict(conversation.to_dict()).to_dict() == conversation.to_dict()
