"""Prompt assembly for a character reply: the character, its attached world books, the
conversation's persona and the path up to the reply, through `PromptAssembler`.

Runs inside a request's store session (off the event loop); generation is not done here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from talkloop.backends.base import ModelBackend
from talkloop.characters.errors import CharacterError
from talkloop.characters.model import Character as CharacterCard
from talkloop.characters.persona import Persona
from talkloop.characters.prompt import (
    HistoryMessage,
    PromptAssembler,
    PromptRequest,
    PromptSettings,
)
from talkloop.characters.tokens import CachingTokenCounter
from talkloop.server.db.models import Conversation, Message
from talkloop.server.errors import BadRequestError, ConflictError
from talkloop.server.store.native import NativeStore


@dataclass(frozen=True)
class BackendCounter:
    """The backend's tokenizer as the runtime's `TokenCounter`."""

    backend: ModelBackend

    def count(self, text: str) -> int:
        return self.backend.count_tokens(text)


@dataclass(frozen=True)
class Speaker:
    card: CharacterCard
    character_id: str


def conversation_speaker(store: NativeStore, conversation: Conversation) -> Speaker:
    if conversation.character_id is None:
        raise ConflictError(
            f"conversation {conversation.id!r} has no character (it was deleted)",
            code="character_deleted",
        )
    row = store.characters.get(conversation.character_id)
    return Speaker(store.characters.card(row), row.id)


def history_of(path: Sequence[Message]) -> list[HistoryMessage]:
    """The prompt's history: empty texts (a reply not yet written) are left out."""
    return [HistoryMessage(m.role, m.content) for m in path if m.content]  # type: ignore[arg-type]


def assemble(
    store: NativeStore,
    backend: ModelBackend,
    speaker: Speaker,
    conversation: Conversation,
    history: Sequence[HistoryMessage],
    max_tokens: int,
) -> list[dict[str, str]]:
    books = [
        store.world_books.lorebook(b) for b in store.world_books.attached(speaker.character_id)
    ]
    persona: Persona = store.personas.for_conversation(conversation.id)
    request = PromptRequest(
        character=speaker.card,
        history=history,
        persona=persona,
        world_books=books,
        conversation_id=conversation.id,
    )
    try:
        settings = PromptSettings(
            context_tokens=backend.context_window, reply_reserve_tokens=max_tokens
        )
        assembler = PromptAssembler(settings, CachingTokenCounter(BackendCounter(backend)))
        return assembler.assemble(request).as_dicts()
    except (CharacterError, ValueError) as exc:
        raise BadRequestError(f"cannot build the prompt: {exc}", param="max_tokens") from None
