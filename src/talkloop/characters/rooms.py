"""Group rooms: several characters and the user in one conversation tree.

Presence (joins and leaves) decides which messages each character sees; lore is private to a
character unless shared with the room. Who speaks next is a `SpeakerStrategy`. Prompt assembly
and generation are not here: a room only says who speaks and what that speaker may see.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from talkloop.characters.conversation import (
    Clock,
    Conversation,
    IdFactory,
    Message,
    new_id,
    utc_now,
)
from talkloop.characters.errors import CharacterError
from talkloop.characters.model import Character, Lorebook
from talkloop.characters.persona import Persona

logger = logging.getLogger(__name__)

DEFAULT_TALKATIVENESS = 0.5  # SillyTavern's default for a character without the extension


class RoomError(CharacterError):
    """A room operation names an unknown or absent character, or is otherwise invalid."""


class RoomMemberError(RoomError, ValueError):
    """A room member's id, name or talkativeness is not usable."""


# ---------------------------------------------------------------- members and presence


@dataclass(frozen=True)
class RoomMember:
    """A character in a room: id, display name, nicknames and talkativeness in [0, 1]."""

    character_id: str
    name: str
    nicknames: tuple[str, ...] = ()
    talkativeness: float = DEFAULT_TALKATIVENESS

    def __post_init__(self) -> None:
        if not self.character_id or not self.name.strip():
            raise RoomMemberError(
                f"a room member needs a character_id and a name, got "
                f"{self.character_id!r} and {self.name!r}"
            )
        if not 0.0 <= self.talkativeness <= 1.0:
            raise RoomMemberError(
                f"talkativeness of {self.name!r} must be in [0, 1], got {self.talkativeness}"
            )

    @classmethod
    def from_character(cls, character_id: str, character: Character) -> RoomMember:
        """Name and V3 nickname from the card; talkativeness from `extensions.talkativeness`."""
        nicknames = (character.nickname,) if character.nickname else ()
        return cls(character_id, character.name, nicknames, _talkativeness(character))

    @property
    def aliases(self) -> tuple[str, ...]:
        """Name, nicknames, and each name word of 3+ letters (as SillyTavern matches names)."""
        words = [w for w in re.findall(r"\w+", self.name) if len(w) >= 3 and w.lower() != "the"]
        return (self.name, *self.nicknames, *words)

    def first_mention(self, text: str) -> int | None:
        """Where an alias first appears in `text` as whole words (any case), if anywhere."""
        positions = [
            found.start()
            for alias in self.aliases
            if (found := re.search(rf"(?<!\w){re.escape(alias)}(?!\w)", text, re.IGNORECASE))
        ]
        return min(positions, default=None)


def _talkativeness(character: Character) -> float:
    raw = character.extensions.get("talkativeness", DEFAULT_TALKATIVENESS)
    try:
        value = float(raw)  # SillyTavern writes it as a string ("0.5")
    except (TypeError, ValueError):
        value = -1.0
    if not 0.0 <= value <= 1.0:
        logger.warning(
            "character %r has talkativeness %r, not a number in [0, 1]; using %s",
            character.name,
            raw,
            DEFAULT_TALKATIVENESS,
        )
        return DEFAULT_TALKATIVENESS
    return value


@dataclass(frozen=True)
class PresenceChanged:
    """A join or a leave. `log_position` is the conversation's event count at that moment:
    messages created at a position >= a join and < the next leave were seen."""

    character_id: str
    joined: bool
    at: datetime
    log_position: int


@dataclass(frozen=True)
class CharacterContext:
    """What one character may use: the messages it saw, its own lore and notes, shared ones."""

    member: RoomMember
    history: tuple[Message, ...]
    lorebooks: tuple[Lorebook, ...]
    notes: tuple[str, ...]


# ---------------------------------------------------------------- the room


class Room:
    """Characters and the user in one group conversation, with presence and private lore."""

    def __init__(
        self,
        *,
        persona: Persona | None = None,
        clock: Clock = utc_now,
        id_factory: IdFactory = new_id,
    ) -> None:
        self.conversation = Conversation(
            persona=persona, group=True, clock=clock, id_factory=id_factory
        )
        self._clock = clock
        self._members: dict[str, RoomMember] = {}
        self._present: set[str] = set()
        self._presence: list[PresenceChanged] = []
        self._private_books: dict[str, list[Lorebook]] = {}
        self._private_notes: dict[str, list[str]] = {}
        self._shared_books: list[Lorebook] = []
        self._shared_notes: list[str] = []

    # -------------------------------------------------------- presence

    @property
    def presence_events(self) -> tuple[PresenceChanged, ...]:
        return tuple(self._presence)

    def member(self, character_id: str) -> RoomMember:
        member = self._members.get(character_id)
        if member is None:
            raise RoomError(
                f"character {character_id!r} has never been in this room; "
                f"members are {sorted(self._members)}"
            )
        return member

    @property
    def members(self) -> list[RoomMember]:
        """Every character that has joined, present or not, in the order they first joined."""
        return list(self._members.values())

    def present_members(self) -> list[RoomMember]:
        """Characters in the room now, in the order they first joined."""
        return [m for cid, m in self._members.items() if cid in self._present]

    def join(self, member: RoomMember) -> None:
        if member.character_id in self._present:
            raise RoomError(f"character {member.character_id!r} is already in the room")
        self._members[member.character_id] = member
        self._present.add(member.character_id)
        self._mark_presence(member.character_id, joined=True)

    def add_character(
        self,
        character_id: str,
        character: Character,
        *,
        world_books: Sequence[Lorebook] = (),
        greet: bool = False,
    ) -> RoomMember:
        """Join with a card: its lorebook and the world books it links become its private lore
        (two characters linking one world book each see it); optionally post its greeting."""
        member = RoomMember.from_character(character_id, character)
        self.join(member)
        own_book = [character.character_book] if character.character_book is not None else []
        for book in (*own_book, *world_books):
            self.add_private_lore(character_id, book)
        if greet:
            self.conversation.greet(character, character_id=character_id)
        return member

    def leave(self, character_id: str) -> None:
        if character_id not in self._present:
            raise RoomError(
                f"character {character_id!r} is not in the room; present: {self._present_ids()}"
            )
        self._present.discard(character_id)
        self._mark_presence(character_id, joined=False)

    # -------------------------------------------------------- messages

    @property
    def last_message(self) -> Message | None:
        path = self.conversation.active_path()
        return path[-1] if path else None

    def post_user(self, content: str) -> Message:
        persona_name = self.conversation.persona.name
        return self.conversation.append("user", content, author_name=persona_name)

    def post(self, character_id: str, content: str) -> Message:
        """A present character speaks."""
        if character_id not in self._present:
            raise RoomError(
                f"character {character_id!r} cannot speak: not in the room; "
                f"present: {self._present_ids()}"
            )
        member = self._members[character_id]
        return self.conversation.append(
            "assistant", content, author_name=member.name, character_id=character_id
        )

    def visible_history(self, character_id: str) -> list[Message]:
        """The active path, less the messages created while the character was away."""
        self.member(character_id)
        spans = self._present_spans(character_id)
        created = self.conversation.creation_order()
        return [
            message
            for message in self.conversation.active_path()
            if any(start <= created.get(message.id, -1) < end for start, end in spans)
        ]

    def last_speaker_id(self) -> str | None:
        """The member who spoke last on the active path, present or not."""
        for message in reversed(self.conversation.active_path()):
            if message.character_id in self._members:
                return message.character_id
        return None

    # -------------------------------------------------------- lore

    def add_private_lore(self, character_id: str, book: Lorebook) -> None:
        self.member(character_id)
        self._private_books.setdefault(character_id, []).append(book)

    def add_private_note(self, character_id: str, note: str) -> None:
        self.member(character_id)
        self._private_notes.setdefault(character_id, []).append(note)

    def share_lore(self, book: Lorebook) -> None:
        """Every character in the room may use this book (e.g. a world book they share)."""
        self._shared_books.append(book)

    def share_note(self, note: str) -> None:
        self._shared_notes.append(note)

    def context_for(self, character_id: str) -> CharacterContext:
        """What `character_id` may see: its history, its private lore and notes, shared ones."""
        member = self.member(character_id)
        return CharacterContext(
            member=member,
            history=tuple(self.visible_history(character_id)),
            lorebooks=(*self._private_books.get(character_id, []), *self._shared_books),
            notes=(*self._private_notes.get(character_id, []), *self._shared_notes),
        )

    # -------------------------------------------------------- turns

    def next_speakers(self, strategy: SpeakerStrategy) -> list[str]:
        return strategy.next_speakers(self, self.last_message)

    # -------------------------------------------------------- internals

    def _present_ids(self) -> list[str]:
        return [member.character_id for member in self.present_members()]

    def _mark_presence(self, character_id: str, *, joined: bool) -> None:
        position = len(self.conversation.events)
        self._presence.append(PresenceChanged(character_id, joined, self._clock(), position))

    def _present_spans(self, character_id: str) -> list[tuple[int, int]]:
        """[join position, leave position) spans; an open span ends at infinity."""
        spans: list[tuple[int, int]] = []
        start: int | None = None
        for change in self._presence:
            if change.character_id != character_id:
                continue
            if change.joined:
                start = change.log_position
            elif start is not None:
                spans.append((start, change.log_position))
                start = None
        if start is not None:
            spans.append((start, len(self.conversation.events) + 1))
        return spans


# ---------------------------------------------------------------- who speaks next


class SpeakerStrategy(Protocol):
    """Picks the character ids to speak next, in order; an empty list means wait for the user."""

    def next_speakers(self, room: Room, last_message: Message | None) -> list[str]: ...


class RoundRobin:
    """One speaker a turn: the present member after the last one who spoke, in join order."""

    def next_speakers(self, room: Room, last_message: Message | None) -> list[str]:
        present = {member.character_id for member in room.present_members()}
        if not present:
            return []
        order = [member.character_id for member in room.members]
        last = room.last_speaker_id()
        start = order.index(last) + 1 if last in order else 0
        rotated = order[start:] + order[:start]
        return [next(character_id for character_id in rotated if character_id in present)]


class NaturalOrder:
    """SillyTavern's natural order: members mentioned in the last message first (by name word
    or nickname, in order of mention), then each member in a shuffled order speaks if
    `random() <= talkativeness`; if nobody did, one random member. The last speaker is
    skipped unless self-responses are on.
    """

    def __init__(self, seed: int, *, allow_self_responses: bool = False) -> None:
        self._rng = random.Random(seed)
        self.allow_self_responses = allow_self_responses

    def next_speakers(self, room: Room, last_message: Message | None) -> list[str]:
        last_speaker = last_message.character_id if last_message else None
        banned = None if self.allow_self_responses else last_speaker
        candidates = [m for m in room.present_members() if m.character_id != banned]
        chosen = _mentioned(candidates, last_message.content if last_message else "")
        shuffled = list(candidates)
        self._rng.shuffle(shuffled)
        for member in shuffled:
            roll = self._rng.random()
            if member.talkativeness >= roll and member.character_id not in chosen:
                chosen.append(member.character_id)
        if not chosen and candidates:
            chosen.append(self._rng.choice(candidates).character_id)
        return chosen


class ManualOrder:
    """The user picks who speaks; nobody speaks until picked. Each pick is used once."""

    def __init__(self) -> None:
        self._picked: list[str] = []

    def pick(self, room: Room, character_id: str) -> None:
        present = [member.character_id for member in room.present_members()]
        if character_id not in present:
            raise RoomError(f"cannot pick {character_id!r}: not in the room; present: {present}")
        self._picked.append(character_id)

    def next_speakers(self, room: Room, last_message: Message | None) -> list[str]:
        present = {member.character_id for member in room.present_members()}
        picked, self._picked = self._picked, []
        return [character_id for character_id in picked if character_id in present]


Chooser = Callable[[str, list[str]], str]
"""`choose(prompt, candidates) -> one candidate`; the server backs it with constrained decoding."""


@dataclass(frozen=True)
class DirectorDecision:
    """One director turn: the candidates offered, the model's answer, and what was used."""

    candidates: tuple[str, ...]
    answer: str
    character_ids: tuple[str, ...]
    fallback_reason: str | None  # None when the model's answer was a candidate


class Director:
    """Asks the model who speaks next; an answer that names no candidate falls back to
    another strategy (round robin unless given), logs why and records it in `decisions`."""

    def __init__(
        self,
        choose: Chooser,
        *,
        fallback: SpeakerStrategy | None = None,
        num_history_messages: int = 8,
    ) -> None:
        if num_history_messages < 1:
            raise ValueError(f"num_history_messages must be >= 1, got {num_history_messages}")
        self._choose = choose
        self.fallback = fallback or RoundRobin()
        self.num_history_messages = num_history_messages
        self.decisions: list[DirectorDecision] = []

    def next_speakers(self, room: Room, last_message: Message | None) -> list[str]:
        labels = _candidate_labels(room.present_members())
        if not labels:
            return []
        candidates = list(labels)
        answer = self._choose(self.prompt(room, candidates), list(candidates))
        label = answer.strip() if isinstance(answer, str) else None
        if label in labels:
            return self._decide(candidates, answer, [labels[label]], None)
        reason = (
            f"director answered {answer!r}, which is not one of {candidates}; "
            f"falling back to {type(self.fallback).__name__}"
        )
        logger.warning(reason)
        return self._decide(
            candidates, answer, self.fallback.next_speakers(room, last_message), reason
        )

    def prompt(self, room: Room, candidates: list[str]) -> str:
        recent = room.conversation.active_path()[-self.num_history_messages :]
        lines = [f"{message.author_name}: {message.content}" for message in recent]
        return "\n".join(
            [
                "You direct a group conversation. Decide which character speaks next.",
                f"Characters present: {', '.join(candidates)}.",
                "",
                "Recent messages:",
                *(lines or ["(none yet)"]),
                "",
                f"Answer with exactly one name from: {', '.join(candidates)}.",
            ]
        )

    def _decide(
        self, candidates: list[str], answer: str, ids: list[str], reason: str | None
    ) -> list[str]:
        self.decisions.append(DirectorDecision(tuple(candidates), answer, tuple(ids), reason))
        return ids


def _candidate_labels(members: list[RoomMember]) -> dict[str, str]:
    """Label -> character id: the name, or `name (id)` where two present members share it."""
    names = [member.name for member in members]
    return {
        (m.name if names.count(m.name) == 1 else f"{m.name} ({m.character_id})"): m.character_id
        for m in members
    }


def _mentioned(members: list[RoomMember], text: str) -> list[str]:
    """Ids of the members named in `text`, in order of first mention."""
    found: list[tuple[int, int, str]] = []
    for index, member in enumerate(members):
        position = member.first_mention(text)
        if position is not None:
            found.append((position, index, member.character_id))
    return [character_id for _, _, character_id in sorted(found)]
