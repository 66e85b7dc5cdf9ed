"""Operations on a conversation's message tree: paging, swipes, regenerate, edit, branch,
delete, and the bookkeeping of replies that are being streamed.

Builds on `ConversationRepo` (rows linked by `parent_id`, swipes on the row). NOTE: a reply
being generated has status `streaming` and its conversation's `updated_at` is its heartbeat
(bumped on every flush); a `streaming` reply whose heartbeat is older than `STALE_AFTER_S`
belongs to a generation that died with its server, and is marked `incomplete` when next read.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import Select

from talkloop.server.db.base import utcnow
from talkloop.server.db.models import Conversation, Message, MessageStatus
from talkloop.server.errors import BadRequestError, ConflictError
from talkloop.server.store.conversations import ConversationRepo
from talkloop.server.store.pagination import Page, PageRequest, paginate
from talkloop.server.store.scoped import Scoped

STALE_AFTER_S = 10.0


class MessageTree(Scoped):
    def __init__(self, conversations: ConversationRepo) -> None:
        super().__init__(conversations.session, conversations.tenant_id)
        self.conversations = conversations

    # ------------------------------------------------------------ reading

    def page_conversations(
        self, end_user_id: str | None, page: PageRequest, *, character_id: str | None = None
    ) -> Page[Conversation]:
        query = self._select(Conversation)
        if end_user_id is not None:
            query = query.where(Conversation.end_user_id == end_user_id)
        if character_id is not None:
            query = query.where(Conversation.character_id == character_id)
        return paginate(self.session, query, Conversation, page)

    def page(
        self, conversation: Conversation, page: PageRequest, *, active_only: bool
    ) -> Page[Message]:
        """The tree's messages oldest first, or only those on the active path."""
        self.repair_stale(conversation)
        query: Select[Message] = self._select(Message).where(
            Message.conversation_id == conversation.id
        )
        if active_only:
            path_ids = [message.id for message in self.conversations.branch(conversation)]
            query = query.where(Message.id.in_(path_ids))
        return paginate(self.session, query, Message, page)

    def repair_stale(self, conversation: Conversation) -> None:
        """Mark replies whose generation died (no heartbeat for STALE_AFTER_S) incomplete."""
        if utcnow() - conversation.updated_at < timedelta(seconds=STALE_AFTER_S):
            return
        self.close_streaming(conversation)

    def close_streaming(self, conversation: Conversation) -> None:
        """Mark every `streaming` reply of the conversation incomplete (its text is kept)."""
        query = self._select(Message).where(
            Message.conversation_id == conversation.id,
            Message.status == MessageStatus.STREAMING,
        )
        for message in self.session.scalars(query):
            message.status = MessageStatus.INCOMPLETE
        self.session.flush()

    def heartbeat(self, conversation: Conversation) -> None:
        conversation.updated_at = utcnow()
        self.session.flush()

    # ------------------------------------------------------------ changing

    def choose_swipe(self, message: Message, swipe_index: int) -> int:
        """Show another alternative; returns the index shown before."""
        self._check_swipe(message, swipe_index)
        previous = message.swipe_index
        message.swipe_index = swipe_index
        message.content = message.swipes[swipe_index]
        self.session.flush()
        return previous

    def start_regeneration(self, message: Message) -> Message:
        """Add an empty swipe to an assistant reply, chosen, to be streamed into."""
        if message.role != "assistant":
            raise BadRequestError(
                f"only assistant messages can be regenerated; message {message.id!r} is "
                f"{message.role!r}",
                param="message_id",
            )
        if message.status == MessageStatus.STREAMING:
            raise ConflictError(f"message {message.id!r} is being generated right now")
        message.swipes = [*message.swipes, ""]
        message.swipe_index = len(message.swipes) - 1
        message.content = ""
        message.status = MessageStatus.STREAMING
        self.session.flush()
        return message

    def abandon_reply(
        self, conversation: Conversation, message: Message, previous_swipe_index: int | None
    ) -> None:
        """Undo `start_regeneration` (or the creation of a new reply row)."""
        if previous_swipe_index is None:
            if conversation.active_leaf_id == message.id:
                conversation.active_leaf_id = message.parent_id
            self.session.delete(message)
        else:
            message.swipes = list(message.swipes)[:-1]
            message.swipe_index = previous_swipe_index
            message.content = message.swipes[previous_swipe_index]
            message.status = MessageStatus.COMPLETE
        self.session.flush()

    def edit(self, message: Message, content: str) -> str:
        """Replace the chosen swipe's text; returns the text before."""
        if message.status == MessageStatus.STREAMING:
            raise ConflictError(f"message {message.id!r} is being generated right now")
        original = message.content
        swipes = list(message.swipes) or [""]
        swipes[message.swipe_index] = content
        message.swipes = swipes
        message.content = content
        self.session.flush()
        return original

    def checkout(self, conversation: Conversation, message_id: str | None) -> None:
        """Make `message_id` the active leaf (None: before the first message)."""
        if message_id is not None:
            self.conversations.get_message(message_id, conversation_id=conversation.id)
        conversation.active_leaf_id = message_id
        self.session.flush()

    def delete(self, conversation: Conversation, message: Message) -> list[str]:
        """Delete a message and its subtree; an active leaf inside it moves to the parent."""
        doomed = self.subtree_ids(conversation, message.id)
        if conversation.active_leaf_id in doomed:
            conversation.active_leaf_id = message.parent_id
        self.session.delete(message)  # children go by ON DELETE CASCADE
        self.session.flush()
        self.session.expire_all()
        return doomed

    def subtree_ids(self, conversation: Conversation, message_id: str) -> list[str]:
        messages = self.conversations.messages(conversation.id)
        children: dict[str | None, list[str]] = {}
        for row in messages:
            children.setdefault(row.parent_id, []).append(row.id)
        found, todo = [], [message_id]
        while todo:
            current = todo.pop()
            found.append(current)
            todo.extend(children.get(current, ()))
        return found

    def path_to(self, conversation: Conversation, leaf_id: str | None) -> Sequence[Message]:
        return self.conversations.branch(conversation, leaf_id)

    @staticmethod
    def _check_swipe(message: Message, swipe_index: int) -> None:
        count = len(message.swipes)
        if not 0 <= swipe_index < count:
            raise BadRequestError(
                f"message {message.id!r} has {count} swipes (indices 0..{count - 1}); "
                f"got {swipe_index}",
                param="swipe_index",
            )
