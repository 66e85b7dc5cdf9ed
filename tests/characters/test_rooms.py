"""Group rooms: speaker strategies, the director, presence visibility and private lore."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from talkloop.characters.model import Character, Lorebook, LorebookEntry
from talkloop.characters.persona import Persona
from talkloop.characters.rooms import (
    Director,
    ManualOrder,
    NaturalOrder,
    Room,
    RoomError,
    RoomMember,
    RoomMemberError,
    RoundRobin,
)

T0 = datetime(2024, 5, 1, tzinfo=UTC)


def fake_clock() -> Callable[[], datetime]:
    seconds: Iterator[int] = iter(range(1, 100_000))
    return lambda: T0 + timedelta(seconds=next(seconds))


def counter_ids() -> Callable[[], str]:
    numbers: Iterator[int] = iter(range(1, 100_000))
    return lambda: f"m{next(numbers)}"


def make_room(*talkativeness: float) -> Room:
    """Members ada, bram, cleo (in that join order) with the given talkativeness."""
    room = Room(persona=Persona("Sam"), clock=fake_clock(), id_factory=counter_ids())
    levels = talkativeness or (0.5, 0.5, 0.5)
    for (character_id, name), level in zip(
        [("ada", "Ada"), ("bram", "Bram Holt"), ("cleo", "Cleo")], levels, strict=True
    ):
        room.join(RoomMember(character_id, name, talkativeness=level))
    return room


def book(name: str, keys: list[str], content: str) -> Lorebook:
    return Lorebook(name=name, entries=[LorebookEntry(keys=keys, content=content)])


# ------------------------------------------------------------------ round robin


def test_round_robin_rotates_through_present_members_in_join_order() -> None:
    room = make_room()
    strategy = RoundRobin()
    room.post_user("Hello, all.")
    spoken: list[str] = []
    for _ in range(4):
        (speaker,) = room.next_speakers(strategy)
        room.post(speaker, f"{speaker} here")
        spoken.append(speaker)
    assert spoken == ["ada", "bram", "cleo", "ada"]
    room.post_user("Bram, go on.")  # a user turn does not reset the rotation
    assert room.next_speakers(strategy) == ["bram"]


def test_round_robin_skips_members_who_left() -> None:
    room = make_room()
    room.post("ada", "First.")
    room.leave("bram")
    assert room.next_speakers(RoundRobin()) == ["cleo"]
    room.post("cleo", "Second.")
    room.leave("ada")
    assert room.next_speakers(RoundRobin()) == ["cleo"]
    room.leave("cleo")
    assert room.next_speakers(RoundRobin()) == []


# ------------------------------------------------------------------ natural order


def test_natural_order_puts_mentioned_members_first_in_order_of_mention() -> None:
    room = make_room(0.0, 0.0, 0.0)
    room.post_user("cleo, what does HOLT think? And you, Ada?")
    assert room.next_speakers(NaturalOrder(seed=1)) == ["cleo", "bram", "ada"]


def test_member_aliases_are_name_nicknames_and_long_name_words() -> None:
    member = RoomMember("k", "Keeper of the Rolls", nicknames=("Kip",))
    assert member.aliases == ("Keeper of the Rolls", "Kip", "Keeper", "Rolls")


def test_natural_order_matches_nicknames_as_whole_words() -> None:
    room = Room(clock=fake_clock(), id_factory=counter_ids())
    room.join(RoomMember("bram", "Bram Holt", nicknames=("the Captain",), talkativeness=0.0))
    room.join(RoomMember("ada", "Ada", talkativeness=0.0))
    room.post_user("Adam asked the captain.")  # "Adam" is not "Ada"
    assert room.next_speakers(NaturalOrder(seed=1)) == ["bram"]


def test_natural_order_skips_the_last_speaker_unless_self_responses_are_on() -> None:
    room = make_room(0.0, 1.0, 0.0)
    room.post("bram", "I, Bram Holt, have spoken. Ada?")
    assert room.next_speakers(NaturalOrder(seed=3)) == ["ada"]
    assert room.next_speakers(NaturalOrder(seed=3, allow_self_responses=True)) == ["bram", "ada"]


def test_natural_order_talkativeness_rolls_with_a_fixed_seed() -> None:
    room = make_room(0.9, 0.1, 0.6)
    room.post_user("Evening.")
    strategy = NaturalOrder(seed=42)
    turns = [room.next_speakers(strategy) for _ in range(4)]
    assert turns == [["bram", "ada", "cleo"], ["ada", "cleo"], ["cleo", "ada"], ["ada"]]
    again = NaturalOrder(seed=42)
    assert [room.next_speakers(again) for _ in range(4)] == turns


def test_natural_order_follows_sillytavern_shuffle_then_roll() -> None:
    """Reference: shuffle the candidates, then one roll each, speak if talkativeness >= roll."""
    room = make_room(0.9, 0.1, 0.6)
    room.post_user("Evening.")
    rng = random.Random(42)
    members = room.present_members()
    rng.shuffle(members)
    expected = [m.character_id for m in members if m.talkativeness >= rng.random()]
    assert room.next_speakers(NaturalOrder(seed=42)) == expected


def test_natural_order_picks_one_at_random_when_nobody_rolls() -> None:
    room = make_room(0.0, 0.0, 0.0)
    room.post("ada", "Quiet night.")
    picks = [room.next_speakers(NaturalOrder(seed=seed)) for seed in range(6)]
    assert all(len(pick) == 1 and pick[0] in {"bram", "cleo"} for pick in picks)
    assert picks == [["cleo"], ["bram"], ["bram"], ["cleo"], ["cleo"], ["bram"]]


# ------------------------------------------------------------------ manual


def test_manual_order_waits_for_the_user_and_uses_each_pick_once() -> None:
    room = make_room()
    manual = ManualOrder()
    room.post_user("Hm.")
    assert room.next_speakers(manual) == []
    manual.pick(room, "cleo")
    manual.pick(room, "ada")
    assert room.next_speakers(manual) == ["cleo", "ada"]
    assert room.next_speakers(manual) == []


def test_manual_order_refuses_absent_characters() -> None:
    room = make_room()
    room.leave("ada")
    with pytest.raises(RoomError, match=r"cannot pick 'ada': not in the room; present: \['bram'"):
        ManualOrder().pick(room, "ada")


# ------------------------------------------------------------------ director


class FakeChooser:
    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, prompt: str, candidates: list[str]) -> str:
        self.calls.append((prompt, candidates))
        return self.answer


def test_director_asks_the_model_and_uses_its_answer() -> None:
    room = make_room()
    room.post_user("Who knows the way to the docks?")
    chooser = FakeChooser(" Bram Holt\n")
    director = Director(chooser)
    assert room.next_speakers(director) == ["bram"]
    prompt, candidates = chooser.calls[0]
    assert candidates == ["Ada", "Bram Holt", "Cleo"]
    assert "Sam: Who knows the way to the docks?" in prompt
    assert prompt.endswith("Answer with exactly one name from: Ada, Bram Holt, Cleo.")
    decision = director.decisions[-1]
    assert (decision.character_ids, decision.fallback_reason) == (("bram",), None)


def test_director_falls_back_clearly_on_an_answer_that_is_no_candidate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    room = make_room()
    room.post("ada", "I'll stay quiet now.")
    director = Director(FakeChooser("Zed"))
    with caplog.at_level(logging.WARNING, logger="talkloop.characters.rooms"):
        assert room.next_speakers(director) == ["bram"]  # round robin after ada
    decision = director.decisions[-1]
    assert decision.answer == "Zed"
    assert decision.fallback_reason == (
        "director answered 'Zed', which is not one of ['Ada', 'Bram Holt', 'Cleo']; "
        "falling back to RoundRobin"
    )
    assert decision.fallback_reason in caplog.text


def test_director_only_offers_present_members_and_labels_shared_names() -> None:
    room = make_room()
    room.leave("cleo")
    room.join(RoomMember("ada2", "Ada"))
    chooser = FakeChooser("Ada (ada2)")
    assert room.next_speakers(Director(chooser)) == ["ada2"]
    assert chooser.calls[0][1] == ["Ada (ada)", "Bram Holt", "Ada (ada2)"]


def test_director_with_nobody_present_asks_nothing() -> None:
    room = Room()
    chooser = FakeChooser("Ada")
    assert room.next_speakers(Director(chooser)) == []
    assert chooser.calls == []


# ------------------------------------------------------------------ presence


def test_a_late_joiner_sees_nothing_from_before_it_joined() -> None:
    room = make_room()
    room.leave("cleo")
    first = room.post_user("One.")
    second = room.post("ada", "Two.")
    room.join(room.member("cleo"))
    third = room.post("bram", "Three.")
    assert room.visible_history("cleo") == [third]
    assert room.visible_history("ada") == [first, second, third]


def test_a_leaver_does_not_see_later_messages_and_sees_them_again_after_rejoining() -> None:
    room = make_room()
    first = room.post_user("One.")
    room.leave("bram")
    room.post("ada", "Two, while Bram is out.")
    room.join(room.member("bram"))
    third = room.post("cleo", "Three.")
    assert room.visible_history("bram") == [first, third]
    assert [p.joined for p in room.presence_events if p.character_id == "bram"] == [
        True,
        False,
        True,
    ]


def test_visibility_follows_the_active_path_after_a_branch() -> None:
    room = make_room()
    first = room.post_user("One.")
    room.post("ada", "Two.")
    branch = room.conversation.branch(first.id, "assistant", "Two again.", author_name="Cleo")
    assert room.visible_history("bram") == [first, branch]


def test_presence_errors_name_the_character() -> None:
    room = make_room()
    with pytest.raises(RoomError, match="'ada' is already in the room"):
        room.join(RoomMember("ada", "Ada"))
    room.leave("ada")
    with pytest.raises(RoomError, match=r"'ada' is not in the room; present: \['bram', 'cleo'\]"):
        room.leave("ada")
    with pytest.raises(RoomError, match="'ada' cannot speak: not in the room"):
        room.post("ada", "Hello?")
    with pytest.raises(RoomError, match="'zed' has never been in this room"):
        room.visible_history("zed")
    assert len(room.conversation) == 0


# ------------------------------------------------------------------ private lore


def test_one_characters_lore_is_hidden_from_the_others_unless_shared() -> None:
    ada = Character(name="Ada", character_book=book("Ada's secrets", ["vault"], "Ada hid it."))
    bram = Character(name="Bram", character_book=book("Bram's", ["ship"], "Bram's ship leaks."))
    world = book("Harbour", ["harbour"], "The harbour freezes in winter.")
    room = Room(clock=fake_clock(), id_factory=counter_ids())
    room.add_character("ada", ada)
    room.add_character("bram", bram)
    room.add_private_note("ada", "Ada owes Bram money.")
    room.share_lore(world)
    room.share_note("It is raining.")

    ada_context = room.context_for("ada")
    bram_context = room.context_for("bram")
    assert ada_context.lorebooks == (ada.character_book, world)
    assert bram_context.lorebooks == (bram.character_book, world)
    assert ada_context.notes == ("Ada owes Bram money.", "It is raining.")
    assert bram_context.notes == ("It is raining.",)

    assert ada.character_book is not None
    room.share_lore(ada.character_book)
    assert ada.character_book in room.context_for("bram").lorebooks


def test_context_carries_only_the_visible_history() -> None:
    room = make_room()
    room.post_user("Before Cleo left.")
    room.leave("cleo")
    room.post_user("After.")
    assert [m.content for m in room.context_for("cleo").history] == ["Before Cleo left."]


# ------------------------------------------------------------------ members from cards


def test_add_character_reads_talkativeness_nickname_and_greets_with_group_greetings() -> None:
    card = Character(
        name="Ada",
        nickname="Addie",
        first_mes="Hello.",
        group_only_greetings=["Hello, all of you."],
        extensions={"talkativeness": "0.7"},
    )
    room = Room(clock=fake_clock(), id_factory=counter_ids())
    member = room.add_character("ada", card, greet=True)
    assert member == RoomMember("ada", "Ada", ("Addie",), 0.7)
    greeting = room.last_message
    assert greeting is not None
    assert greeting.swipes == ("Hello.", "Hello, all of you.")
    assert room.visible_history("ada") == [greeting]


def test_a_card_with_junk_talkativeness_gets_the_default(caplog: pytest.LogCaptureFixture) -> None:
    card = Character(name="Odd", extensions={"talkativeness": "chatty"})
    with caplog.at_level(logging.WARNING):
        assert RoomMember.from_character("odd", card).talkativeness == 0.5
    assert "talkativeness 'chatty'" in caplog.text


def test_member_validation() -> None:
    with pytest.raises(ValueError, match=r"talkativeness of 'Ada' must be in \[0, 1\], got 1.5"):
        RoomMember("ada", "Ada", talkativeness=1.5)
    with pytest.raises(ValueError, match="needs a character_id and a name"):
        RoomMember("", "Ada")


def test_world_books_linked_by_a_card_are_private_to_each_linking_character() -> None:
    world = book("Harbour", ["harbour"], "The harbour freezes in winter.")
    room = Room(clock=fake_clock(), id_factory=counter_ids())
    room.add_character("ada", Character(name="Ada"), world_books=[world])
    room.add_character("bram", Character(name="Bram"), world_books=[world])
    room.add_character("cleo", Character(name="Cleo"))
    assert room.context_for("ada").lorebooks == (world,)
    assert room.context_for("bram").lorebooks == (world,)
    assert room.context_for("cleo").lorebooks == ()


def test_member_errors_are_room_errors_and_value_errors() -> None:
    with pytest.raises(RoomError):
        RoomMember("ada", " ")
    assert issubclass(RoomMemberError, ValueError)
