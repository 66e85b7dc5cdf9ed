"""World books of one tenant (`lorebook_v3` data) and their attachment to characters.

Owned like characters: one created for an end-user is theirs alone, one created without an
end-user is shared by the tenant. A character's prompt uses every book attached to it.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Select, or_, select
from sqlalchemy.exc import IntegrityError

from talkloop.characters.model import Lorebook
from talkloop.server.db.models import Character
from talkloop.server.errors import ConflictError, NotFoundError
from talkloop.server.store.native_tables import CharacterWorldBook, WorldBook
from talkloop.server.store.pagination import Page, PageRequest, paginate
from talkloop.server.store.scoped import Scoped


class WorldBookRepo(Scoped):
    def _visible(self, end_user_id: str | None) -> Select[WorldBook]:
        query = self._select(WorldBook)
        if end_user_id is None:
            return query
        mine = or_(WorldBook.end_user_id.is_(None), WorldBook.end_user_id == end_user_id)
        return query.where(mine)

    def create(self, book: Lorebook, end_user_id: str | None, name: str | None = None) -> WorldBook:
        row = WorldBook(name=name or book.name or "", book=book.to_spec(), end_user_id=end_user_id)
        return self._add(row)

    def get(self, book_id: str, end_user_id: str | None) -> WorldBook:
        row = self.session.scalars(
            self._visible(end_user_id).where(WorldBook.id == book_id)
        ).first()
        if row is None:
            raise NotFoundError(f"no world book with id {book_id!r}")
        return row

    def page(self, end_user_id: str | None, page: PageRequest) -> Page[WorldBook]:
        return paginate(self.session, self._visible(end_user_id), WorldBook, page)

    def update(self, row: WorldBook, book: Lorebook | None, name: str | None) -> WorldBook:
        if book is not None:
            row.book = book.to_spec()
        if name is not None:
            row.name = name
        self.session.flush()
        return row

    def delete(self, row: WorldBook) -> None:
        self.session.delete(row)
        self.session.flush()

    def lorebook(self, row: WorldBook) -> Lorebook:
        return Lorebook.from_spec(row.book)

    def attach(self, character: Character, book: WorldBook) -> None:
        link = CharacterWorldBook(character_id=character.id, world_book_id=book.id)
        try:
            with self.session.begin_nested():
                self._add(link)
        except IntegrityError:
            raise ConflictError(
                f"world book {book.id!r} is already attached to character {character.id!r}"
            ) from None

    def detach(self, character: Character, book: WorldBook) -> None:
        query = self._select(CharacterWorldBook).where(
            CharacterWorldBook.character_id == character.id,
            CharacterWorldBook.world_book_id == book.id,
        )
        link = self.session.scalars(query).first()
        if link is None:
            raise NotFoundError(
                f"world book {book.id!r} is not attached to character {character.id!r}"
            )
        self.session.delete(link)
        self.session.flush()

    def page_attached(
        self, character_id: str, end_user_id: str | None, page: PageRequest
    ) -> Page[WorldBook]:
        linked = select(CharacterWorldBook.world_book_id).where(
            CharacterWorldBook.tenant_id == self.tenant_id,
            CharacterWorldBook.character_id == character_id,
        )
        query = self._visible(end_user_id).where(WorldBook.id.in_(linked))
        return paginate(self.session, query, WorldBook, page)

    def attached(self, character_id: str) -> Sequence[WorldBook]:
        """The books attached to a character, in the order they were attached."""
        query = (
            self._select(WorldBook)
            .join(CharacterWorldBook, CharacterWorldBook.world_book_id == WorldBook.id)
            .where(CharacterWorldBook.character_id == character_id)
            .order_by(CharacterWorldBook.created_at, CharacterWorldBook.id)
        )
        return self.session.scalars(query).all()
