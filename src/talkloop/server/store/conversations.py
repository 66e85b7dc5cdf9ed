"""Conversations of one tenant and their message trees (rows linked by `parent_id`).

An end-user sees only the conversations they own; a request without an end-user sees every
conversation of its tenant. Branching, swipes and edits build on `add_message` and `branch`.
"""

from __future__ import annotations

from collections.abc import Sequence

from talkloop.server.db.models import Conversation, Message, MessageStatus
from talkloop.server.errors import NotFoundError
from talkloop.server.store.scoped import Scoped


class ConversationRepo(Scoped):
    def create(
        self, *, end_user_id: str | None = None, character_id: str | None = None, title: str = ""
    ) -> Conversation:
        row = Conversation(end_user_id=end_user_id, character_id=character_id, title=title)
        return self._add(row)

    def get(self, conversation_id: str, *, end_user_id: str | None = None) -> Conversation:
        """The conversation; NotFoundError if another tenant or another end-user owns it."""
        row = self._get(Conversation, conversation_id, "conversation")
        if end_user_id is not None and row.end_user_id != end_user_id:
            raise NotFoundError(f"no conversation with id {conversation_id!r}")
        return row

    def all(self, *, end_user_id: str | None = None) -> Sequence[Conversation]:
        query = self._select(Conversation).order_by(Conversation.created_at)
        if end_user_id is not None:
            query = query.where(Conversation.end_user_id == end_user_id)
        return self.session.scalars(query).all()

    def add_message(
        self,
        conversation: Conversation,
        role: str,
        content: str,
        *,
        parent_id: str | None = None,
        status: MessageStatus = MessageStatus.COMPLETE,
        name: str | None = None,
    ) -> Message:
        """Append under `parent_id` (default: the active leaf) and make it the active leaf."""
        parent = parent_id if parent_id is not None else conversation.active_leaf_id
        if parent is not None:
            self.get_message(parent, conversation_id=conversation.id)
        row = Message(
            conversation_id=conversation.id,
            parent_id=parent,
            role=role,
            content=content,
            swipes=[content],
            status=status,
            name=name,
        )
        self._add(row)
        conversation.active_leaf_id = row.id
        self.session.flush()
        return row

    def get_message(self, message_id: str, *, conversation_id: str | None = None) -> Message:
        row = self._get(Message, message_id, "message")
        if conversation_id is not None and row.conversation_id != conversation_id:
            raise NotFoundError(f"no message with id {message_id!r} in this conversation")
        return row

    def set_message_text(self, message: Message, content: str, status: MessageStatus) -> Message:
        """Replace the current swipe's text and status (a reply as it streams or completes)."""
        swipes = list(message.swipes) or [""]
        swipes[message.swipe_index] = content
        message.swipes = swipes
        message.content = content
        message.status = status
        self.session.flush()
        return message

    def messages(self, conversation_id: str) -> Sequence[Message]:
        query = self._select(Message).where(Message.conversation_id == conversation_id)
        return self.session.scalars(query.order_by(Message.created_at, Message.id)).all()

    def branch(self, conversation: Conversation, leaf_id: str | None = None) -> list[Message]:
        """Messages from the root to `leaf_id` (default: the active leaf), oldest first."""
        by_id = {message.id: message for message in self.messages(conversation.id)}
        path: list[Message] = []
        current = leaf_id if leaf_id is not None else conversation.active_leaf_id
        while current is not None and current in by_id and len(path) <= len(by_id):
            path.append(by_id[current])
            current = by_id[current].parent_id
        return path[::-1]
