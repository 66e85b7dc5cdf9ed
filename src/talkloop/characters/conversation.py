"""Conversation trees: messages with swipes, edits, branches and deletes, plus an event log.

The active path (root to head) is what the prompt sees. Every choice a person makes (a swipe, an
edit, a branch) is recorded as a timestamped event for the flywheel. Plain data only: no prompt
assembly, no macro substitution and no storage (`to_dict`/`from_dict` hand that to the server).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from talkloop.characters.errors import CharacterError
from talkloop.characters.model import Character
from talkloop.characters.persona import Persona

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")
FORMAT_VERSION = 1

Clock = Callable[[], datetime]
IdFactory = Callable[[], str]


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class ConversationError(CharacterError):
    """A conversation operation or document is invalid; the conversation is left unchanged."""


def greetings_for(character: Character, *, group: bool) -> list[str]:
    """Greeting swipes: first_mes, alternate greetings, then (in groups) group-only greetings."""
    candidates = [character.first_mes, *character.alternate_greetings]
    if group:
        candidates.extend(character.group_only_greetings)
    return [text for text in candidates if text.strip()]


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class Edit:
    """One edit of one swipe: the text before and after, who made it and when."""

    swipe_index: int
    before: str
    after: str
    editor: str
    edited_at: datetime


@dataclass(frozen=True)
class Message:
    """One node of the tree. `swipes` are alternative texts; `swipe_index` is the chosen one."""

    id: str
    parent_id: str | None
    role: Role
    author_name: str
    swipes: tuple[str, ...]
    swipe_index: int
    created_at: datetime
    character_id: str | None = None
    edits: tuple[Edit, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConversationError(f"message role must be one of {ROLES}, got {self.role!r}")
        if not self.swipes:
            raise ConversationError(f"message {self.id!r} needs at least one swipe (its text)")
        if not 0 <= self.swipe_index < len(self.swipes):
            raise ConversationError(_swipe_range_message(self, self.swipe_index))

    @property
    def content(self) -> str:
        return self.swipes[self.swipe_index]

    @property
    def edited_from(self) -> str | None:
        """The original text of the chosen swipe, if it was edited; otherwise None."""
        for edit in self.edits:
            if edit.swipe_index == self.swipe_index:
                return edit.before
        return None

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["swipes"] = list(self.swipes)
        data["created_at"] = self.created_at.isoformat()
        data["edits"] = [_edit_to_dict(edit) for edit in self.edits]
        data["metadata"] = copy.deepcopy(dict(self.metadata))
        data["content"] = self.content  # convenience for readers; ignored by from_dict
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Message:
        return cls(
            id=str(data["id"]),
            parent_id=data.get("parent_id"),
            role=data["role"],
            author_name=str(data["author_name"]),
            swipes=tuple(str(text) for text in data["swipes"]),
            swipe_index=int(data["swipe_index"]),
            created_at=datetime.fromisoformat(data["created_at"]),
            character_id=data.get("character_id"),
            edits=tuple(_edit_from_dict(edit) for edit in data.get("edits", ())),
            metadata=copy.deepcopy(dict(data.get("metadata", {}))),
        )


def _edit_to_dict(edit: Edit) -> dict[str, Any]:
    return {
        "swipe_index": edit.swipe_index,
        "before": edit.before,
        "after": edit.after,
        "editor": edit.editor,
        "edited_at": edit.edited_at.isoformat(),
    }


def _edit_from_dict(data: Mapping[str, Any]) -> Edit:
    return Edit(
        swipe_index=int(data["swipe_index"]),
        before=str(data["before"]),
        after=str(data["after"]),
        editor=str(data["editor"]),
        edited_at=datetime.fromisoformat(data["edited_at"]),
    )


def _swipe_range_message(message: Message, index: int) -> str:
    count = len(message.swipes)
    return f"message {message.id!r} has {count} swipes (indices 0..{count - 1}); got {index}"


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class ConversationEvent:
    """Something a person or the model did to the tree, and when (from the injected clock)."""

    kind: ClassVar[str] = "event"
    at: datetime


@dataclass(frozen=True)
class MessageAdded(ConversationEvent):
    kind: ClassVar[str] = "message_added"
    message_id: str
    parent_id: str | None
    role: str


@dataclass(frozen=True)
class Branched(ConversationEvent):
    """A new child of an earlier message: the user rewound and went another way."""

    kind: ClassVar[str] = "branched"
    message_id: str
    parent_id: str


@dataclass(frozen=True)
class Regenerated(ConversationEvent):
    kind: ClassVar[str] = "regenerated"
    message_id: str
    swipe_index: int


@dataclass(frozen=True)
class SwipeChosen(ConversationEvent):
    kind: ClassVar[str] = "swipe_chosen"
    message_id: str
    previous_index: int
    swipe_index: int


@dataclass(frozen=True)
class MessageEdited(ConversationEvent):
    kind: ClassVar[str] = "message_edited"
    message_id: str
    swipe_index: int
    before: str
    after: str
    editor: str


@dataclass(frozen=True)
class MessageDeleted(ConversationEvent):
    kind: ClassVar[str] = "message_deleted"
    message_id: str
    deleted_ids: tuple[str, ...]


@dataclass(frozen=True)
class HeadMoved(ConversationEvent):
    """The user switched to another branch (or to before the first message, with None)."""

    kind: ClassVar[str] = "head_moved"
    message_id: str | None
    previous_id: str | None


@dataclass(frozen=True)
class PersonaChanged(ConversationEvent):
    kind: ClassVar[str] = "persona_changed"
    name: str
    description: str


EVENT_TYPES: dict[str, type[ConversationEvent]] = {
    cls.kind: cls
    for cls in (
        MessageAdded,
        Branched,
        Regenerated,
        SwipeChosen,
        MessageEdited,
        MessageDeleted,
        HeadMoved,
        PersonaChanged,
    )
}
CREATION_EVENTS = (MessageAdded, Branched)


def event_to_dict(event: ConversationEvent) -> dict[str, Any]:
    data: dict[str, Any] = {"type": event.kind}
    for f in fields(event):
        value = getattr(event, f.name)
        data[f.name] = list(value) if isinstance(value, tuple) else value
    data["at"] = event.at.isoformat()
    return data


def event_from_dict(data: Mapping[str, Any]) -> ConversationEvent:
    cls = EVENT_TYPES.get(str(data.get("type")))
    if cls is None:
        raise ConversationError(
            f"unknown conversation event type {data.get('type')!r}; "
            f"expected one of {sorted(EVENT_TYPES)}"
        )
    kwargs = {f.name: data[f.name] for f in fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    kwargs["at"] = datetime.fromisoformat(data["at"])
    return cls(**kwargs)


# ---------------------------------------------------------------- the tree


class Conversation:
    """A tree of messages with a head; the active path runs from a root down to the head.

    NOTE: every operation validates before it mutates, so a raised ConversationError leaves the
    messages, the head and the event log exactly as they were.
    """

    def __init__(
        self,
        *,
        persona: Persona | None = None,
        group: bool = False,
        clock: Clock = utc_now,
        id_factory: IdFactory = new_id,
        conversation_id: str | None = None,
    ) -> None:
        self.id = conversation_id or id_factory()
        self.group = group
        self._persona = persona or Persona()
        self._clock = clock
        self._new_id = id_factory
        self._messages: dict[str, Message] = {}
        self._children: dict[str | None, list[str]] = {None: []}
        self._head_id: str | None = None
        self._events: list[ConversationEvent] = []

    # -------------------------------------------------------- reading

    @property
    def persona(self) -> Persona:
        return self._persona

    @property
    def head_id(self) -> str | None:
        return self._head_id

    @property
    def events(self) -> tuple[ConversationEvent, ...]:
        return tuple(self._events)

    @property
    def messages(self) -> tuple[Message, ...]:
        """Every message, parents before children (creation order)."""
        return tuple(self._messages.values())

    def __len__(self) -> int:
        return len(self._messages)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._messages

    def get(self, message_id: str) -> Message:
        message = self._messages.get(message_id)
        if message is None:
            raise ConversationError(
                f"conversation {self.id!r} has no message with id {message_id!r} "
                f"({len(self._messages)} messages)"
            )
        return message

    def children(self, message_id: str | None) -> list[Message]:
        """Child messages in creation order; None gives the roots."""
        if message_id is not None:
            self.get(message_id)
        return [self._messages[child_id] for child_id in self._children.get(message_id, [])]

    def active_path(self) -> list[Message]:
        """Messages from the root to the head: what the prompt sees."""
        path: list[Message] = []
        node_id = self._head_id
        while node_id is not None:
            message = self._messages[node_id]
            path.append(message)
            node_id = message.parent_id
        path.reverse()
        return path

    def creation_order(self) -> dict[str, int]:
        """Message id -> position in the event log of the event that created it."""
        return {
            event.message_id: position
            for position, event in enumerate(self._events)
            if isinstance(event, CREATION_EVENTS)
        }

    # -------------------------------------------------------- growing

    def append(
        self,
        role: Role,
        content: str,
        *,
        author_name: str,
        character_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Message:
        """Add a message after the head and make it the head."""
        at = self._clock()
        message = self._new_message(at, self._head_id, role, (content,), author_name, character_id)
        message = replace(message, metadata=dict(metadata or {}))
        self._insert(message)
        self._events.append(MessageAdded(at, message.id, message.parent_id, role))
        return message

    def greet(self, character: Character, *, character_id: str | None = None) -> Message:
        """Append the character's greeting, its alternatives offered as swipes of one message."""
        greetings = greetings_for(character, group=self.group)
        if not greetings:
            raise ConversationError(
                f"character {character.name!r} has no greeting: first_mes, alternate_greetings"
                f"{' and group_only_greetings' if self.group else ''} are all empty"
            )
        at = self._clock()
        message = self._new_message(
            at, self._head_id, "assistant", tuple(greetings), character.name, character_id
        )
        self._insert(message)
        self._events.append(MessageAdded(at, message.id, message.parent_id, "assistant"))
        return message

    def branch(
        self,
        parent_id: str,
        role: Role,
        content: str,
        *,
        author_name: str,
        character_id: str | None = None,
    ) -> Message:
        """Start a new path: a new child of `parent_id`, which becomes the head."""
        self.get(parent_id)
        at = self._clock()
        message = self._new_message(at, parent_id, role, (content,), author_name, character_id)
        self._insert(message)
        self._events.append(Branched(at, message.id, parent_id))
        return message

    def regenerate(self, message_id: str, content: str) -> Message:
        """Add a new swipe to a model reply and choose it."""
        message = self.get(message_id)
        if message.role != "assistant":
            raise ConversationError(
                f"only assistant messages can be regenerated; message {message_id!r} is "
                f"{message.role!r}"
            )
        swipes = (*message.swipes, content)
        updated = replace(message, swipes=swipes, swipe_index=len(swipes) - 1)
        self._messages[message_id] = updated
        self._events.append(Regenerated(self._clock(), message_id, updated.swipe_index))
        return updated

    # -------------------------------------------------------- changing

    def choose_swipe(self, message_id: str, swipe_index: int) -> Message:
        """Show another swipe of a message; choosing the current one records nothing."""
        message = self.get(message_id)
        if not 0 <= swipe_index < len(message.swipes):
            raise ConversationError(_swipe_range_message(message, swipe_index))
        if swipe_index == message.swipe_index:
            return message
        updated = replace(message, swipe_index=swipe_index)
        self._messages[message_id] = updated
        self._events.append(
            SwipeChosen(self._clock(), message_id, message.swipe_index, swipe_index)
        )
        return updated

    def edit(self, message_id: str, content: str, *, editor: str) -> Message:
        """Replace the chosen swipe's text, keeping the text before and who edited it."""
        message = self.get(message_id)
        if not editor.strip():
            raise ConversationError(f"an edit of message {message_id!r} needs a non-empty editor")
        at = self._clock()
        edit = Edit(message.swipe_index, message.content, content, editor, at)
        swipes = list(message.swipes)
        swipes[message.swipe_index] = content
        updated = replace(message, swipes=tuple(swipes), edits=(*message.edits, edit))
        self._messages[message_id] = updated
        self._events.append(
            MessageEdited(at, message_id, edit.swipe_index, edit.before, content, editor)
        )
        return updated

    def delete(self, message_id: str) -> tuple[str, ...]:
        """Remove a message and its subtree; a head inside it moves to the message's parent."""
        message = self.get(message_id)
        doomed = tuple(self._subtree_ids(message_id))
        for doomed_id in doomed:
            del self._messages[doomed_id]
            self._children.pop(doomed_id, None)
        self._children[message.parent_id].remove(message_id)
        if self._head_id in doomed:
            self._head_id = message.parent_id
        self._events.append(MessageDeleted(self._clock(), message_id, doomed))
        return doomed

    def checkout(self, message_id: str | None) -> None:
        """Make `message_id` the head (None: before the first message), switching branches."""
        if message_id is not None:
            self.get(message_id)
        if message_id == self._head_id:
            return
        previous = self._head_id
        self._head_id = message_id
        self._events.append(HeadMoved(self._clock(), message_id, previous))

    def set_persona(self, persona: Persona) -> None:
        self._persona = persona
        self._events.append(PersonaChanged(self._clock(), persona.name, persona.description))

    # -------------------------------------------------------- persistence

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "id": self.id,
            "group": self.group,
            "persona": self._persona.to_dict(),
            "head_id": self._head_id,
            "messages": [message.to_dict() for message in self._messages.values()],
            "events": [event_to_dict(event) for event in self._events],
        }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, clock: Clock = utc_now, id_factory: IdFactory = new_id
    ) -> Conversation:
        """Rebuild a conversation from `to_dict` output; bad documents raise ConversationError."""
        if data.get("version") != FORMAT_VERSION:
            raise ConversationError(
                f"conversation format version {data.get('version')!r} is not supported; "
                f"expected {FORMAT_VERSION}"
            )
        try:
            return cls._from_valid_version(data, clock, id_factory)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversationError(f"invalid conversation document: {exc!r}") from exc

    @classmethod
    def _from_valid_version(
        cls, data: Mapping[str, Any], clock: Clock, id_factory: IdFactory
    ) -> Conversation:
        conversation = cls(
            persona=Persona.from_dict(data["persona"]),
            group=bool(data["group"]),
            clock=clock,
            id_factory=id_factory,
            conversation_id=str(data["id"]),
        )
        for message_data in data["messages"]:
            conversation._insert_loaded(Message.from_dict(message_data))
        head_id = data["head_id"]
        if head_id is not None:
            conversation.get(head_id)
        conversation._head_id = head_id
        conversation._events = [event_from_dict(event) for event in data["events"]]
        return conversation

    # -------------------------------------------------------- internals

    def _new_message(
        self,
        at: datetime,
        parent_id: str | None,
        role: Role,
        swipes: tuple[str, ...],
        author_name: str,
        character_id: str | None,
    ) -> Message:
        message_id = self._new_id()
        if message_id in self._messages:
            raise ConversationError(f"id factory returned an id already in use: {message_id!r}")
        return Message(
            id=message_id,
            parent_id=parent_id,
            role=role,
            author_name=author_name,
            swipes=swipes,
            swipe_index=0,
            created_at=at,
            character_id=character_id,
        )

    def _insert(self, message: Message) -> None:
        self._insert_loaded(message)
        self._head_id = message.id

    def _insert_loaded(self, message: Message) -> None:
        if message.id in self._messages:
            raise ConversationError(f"duplicate message id {message.id!r}")
        if message.parent_id is not None and message.parent_id not in self._messages:
            raise ConversationError(
                f"message {message.id!r} names parent {message.parent_id!r}, which does not "
                "come before it"
            )
        self._messages[message.id] = message
        self._children.setdefault(message.parent_id, []).append(message.id)
        self._children[message.id] = []

    def _subtree_ids(self, message_id: str) -> Iterable[str]:
        stack = [message_id]
        while stack:
            node_id = stack.pop()
            yield node_id
            stack.extend(reversed(self._children.get(node_id, [])))
