"""Feedback events of one tenant: ratings given by users, and the swipe choices and edits
recorded as they happen. The per-tenant export is what the flywheel trains from.
"""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import Select

from talkloop.server.db.models import Conversation, Message
from talkloop.server.errors import NotFoundError
from talkloop.server.store.native_tables import FeedbackEvent, FeedbackKind
from talkloop.server.store.pagination import Page, PageRequest, paginate
from talkloop.server.store.scoped import Scoped

EXPORT_BATCH_ROWS = 500


class FeedbackRepo(Scoped):
    def _owned(self, end_user_id: str | None) -> Select[FeedbackEvent]:
        query = self._select(FeedbackEvent)
        if end_user_id is not None:
            query = query.where(FeedbackEvent.end_user_id == end_user_id)
        return query

    def record(
        self, conversation: Conversation, message: Message, kind: FeedbackKind, **fields: object
    ) -> FeedbackEvent:
        row = FeedbackEvent(
            conversation_id=conversation.id,
            message_id=message.id,
            end_user_id=conversation.end_user_id,
            character_id=conversation.character_id,
            kind=kind,
            **fields,
        )
        return self._add(row)

    def get(self, feedback_id: str, end_user_id: str | None) -> FeedbackEvent:
        query = self._owned(end_user_id).where(FeedbackEvent.id == feedback_id)
        row = self.session.scalars(query).first()
        if row is None:
            raise NotFoundError(f"no feedback with id {feedback_id!r}")
        return row

    def page(
        self, end_user_id: str | None, page: PageRequest, *, message_id: str | None = None
    ) -> Page[FeedbackEvent]:
        query = self._owned(end_user_id)
        if message_id is not None:
            query = query.where(FeedbackEvent.message_id == message_id)
        return paginate(self.session, query, FeedbackEvent, page)

    def delete(self, row: FeedbackEvent) -> None:
        self.session.delete(row)
        self.session.flush()

    def export(self, end_user_id: str | None) -> Iterator[FeedbackEvent]:
        """Every event of the tenant (or of one end-user), oldest first, read in batches."""
        query = self._owned(end_user_id).order_by(FeedbackEvent.created_at, FeedbackEvent.id)
        yield from self.session.scalars(query.execution_options(yield_per=EXPORT_BATCH_ROWS))
