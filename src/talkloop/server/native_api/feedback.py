"""`/api/feedback`: ratings on any message (1-4 stars, thumbs up/down, free text, tags), the
swipe choices and edits recorded as feedback too, and the tenant's export as JSON lines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, model_validator

from talkloop.server.deps import ServicesDep
from talkloop.server.errors import BadRequestError
from talkloop.server.native_api.deps import CallerDep, PageDep
from talkloop.server.native_api.messages import owned_message
from talkloop.server.native_api.schemas import Deleted, ListPage, Strict
from talkloop.server.services import Services
from talkloop.server.store.native import NativeStore
from talkloop.server.store.native_tables import FeedbackEvent, FeedbackKind

router = APIRouter(tags=["feedback"])
MAX_TAGS = 32


class FeedbackCreate(Strict):
    stars: int | None = Field(default=None, ge=1, le=4)
    thumbs: Literal["up", "down"] | None = None
    text: str | None = Field(default=None, max_length=20_000)
    tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS, examples=[["funny"]])

    @model_validator(mode="after")
    def _something_given(self) -> FeedbackCreate:
        if self.stars is None and self.thumbs is None and not self.text and not self.tags:
            raise BadRequestError("feedback needs stars, thumbs, text or tags")
        return self


class FeedbackPublic(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    kind: FeedbackKind
    conversation_id: str
    message_id: str
    character_id: str | None
    stars: int | None
    thumbs: Literal["up", "down"] | None
    text: str | None
    tags: list[str]
    swipe_index: int | None
    previous_swipe_index: int | None
    original_text: str | None
    edited_text: str | None
    editor: str | None
    created_at: datetime


THUMBS = {"up": 1, "down": -1}


def feedback_public(row: FeedbackEvent) -> FeedbackPublic:
    thumbs = {1: "up", -1: "down"}.get(row.thumbs or 0)
    return FeedbackPublic(
        id=row.id,
        kind=FeedbackKind(row.kind),
        conversation_id=row.conversation_id,
        message_id=row.message_id,
        character_id=row.character_id,
        stars=row.stars,
        thumbs=thumbs,  # type: ignore[arg-type]
        text=row.text,
        tags=list(row.tags),
        swipe_index=row.swipe_index,
        previous_swipe_index=row.previous_swipe_index,
        original_text=row.original_text,
        edited_text=row.edited_text,
        editor=row.editor,
        created_at=row.created_at,
    )


@router.post("/conversations/{conversation_id}/messages/{message_id}/feedback", status_code=201)
def rate_message(
    conversation_id: str, message_id: str, body: FeedbackCreate, caller: CallerDep
) -> FeedbackPublic:
    conversation, message = owned_message(caller, conversation_id, message_id)
    row = caller.store.feedback.record(
        conversation,
        message,
        FeedbackKind.RATING,
        stars=body.stars,
        thumbs=THUMBS.get(body.thumbs or ""),
        text=body.text,
        tags=body.tags,
        swipe_index=message.swipe_index,
    )
    caller.commit()
    return feedback_public(row)


@router.get("/feedback")
def list_feedback(
    caller: CallerDep, page: PageDep, message_id: str | None = None
) -> ListPage[FeedbackPublic]:
    found = caller.store.feedback.page(caller.end_user_id, page, message_id=message_id)
    return ListPage[FeedbackPublic].of(found, feedback_public)


@router.get(
    "/feedback/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
def export_feedback(caller: CallerDep, services: ServicesDep) -> StreamingResponse:
    """Every feedback event of the tenant as JSON lines (one `FeedbackPublic` a line)."""
    lines = _export_lines(services, caller.principal.tenant_id, caller.end_user_id)
    return StreamingResponse(lines, media_type="application/x-ndjson")


def _export_lines(services: Services, tenant_id: str, end_user_id: str | None) -> Iterator[str]:
    with services.db.session() as session:
        store = NativeStore(session, tenant_id)
        for row in store.feedback.export(end_user_id):
            yield json.dumps(feedback_public(row).model_dump(mode="json")) + "\n"


@router.get("/feedback/{feedback_id}")
def get_feedback(feedback_id: str, caller: CallerDep) -> FeedbackPublic:
    return feedback_public(caller.store.feedback.get(feedback_id, caller.end_user_id))


@router.delete("/feedback/{feedback_id}")
def delete_feedback(feedback_id: str, caller: CallerDep) -> Deleted:
    caller.store.feedback.delete(caller.store.feedback.get(feedback_id, caller.end_user_id))
    caller.commit()
    return Deleted(id=feedback_id, object="feedback")
