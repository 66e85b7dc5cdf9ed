"""Characters of one tenant: stored as card JSON, found by id or by slug."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError

from talkloop.characters.model import Character as CharacterCard
from talkloop.server.db.models import Character
from talkloop.server.errors import ConflictError
from talkloop.server.store.scoped import Scoped


class CharacterRepo(Scoped):
    def create(self, slug: str, card: CharacterCard) -> Character:
        row = Character(slug=slug, name=card.name, card=card.to_spec())
        try:
            with self.session.begin_nested():
                return self._add(row)
        except IntegrityError:
            raise ConflictError(f"a character with slug {slug!r} already exists") from None

    def get(self, character_id: str) -> Character:
        return self._get(Character, character_id, "character")

    def resolve(self, ref: str) -> Character | None:
        """The character whose id or slug is `ref`."""
        query = self._select(Character).where(or_(Character.id == ref, Character.slug == ref))
        return self.session.scalars(query).first()

    def all(self) -> Sequence[Character]:
        return self.session.scalars(self._select(Character).order_by(Character.slug)).all()

    def count(self) -> int:
        query = select(func.count()).select_from(self._select(Character).subquery())
        return self.session.scalar(query) or 0

    def card(self, row: Character) -> CharacterCard:
        return CharacterCard.from_spec(row.card)
