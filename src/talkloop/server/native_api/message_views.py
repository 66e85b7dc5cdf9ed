"""The public shape of a message (shared by conversations, rooms and the reply stream)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from talkloop.server.db.models import Message


class MessagePublic(BaseModel):
    id: str
    object: Literal["message"] = "message"
    conversation_id: str
    parent_id: str | None
    role: str
    name: str | None = Field(description="who spoke: the persona or the character")
    content: str = Field(description="the chosen swipe's text")
    swipes: list[str]
    swipe_index: int
    status: Literal["complete", "streaming", "incomplete"] = Field(
        description="`incomplete`: the stream broke; `content` is the text saved before"
    )
    created_at: datetime


def message_public(row: Message) -> MessagePublic:
    return MessagePublic(
        id=row.id,
        conversation_id=row.conversation_id,
        parent_id=row.parent_id,
        role=row.role,
        name=row.name,
        content=row.content,
        swipes=list(row.swipes),
        swipe_index=row.swipe_index,
        status=row.status,  # type: ignore[arg-type]
        created_at=row.created_at,
    )
