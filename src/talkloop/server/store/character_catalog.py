"""The characters one caller may see: the tenant's shared ones plus an end-user's own.

A character created on behalf of an end-user is that end-user's (a `CharacterOwner` row);
one created without an end-user is shared by the whole tenant. A request without an
end-user sees every character of its tenant. Avatars are kept beside the card.
"""

from __future__ import annotations

import re
import secrets

from sqlalchemy import Select, or_, select

from talkloop.characters.model import Character as CharacterCard
from talkloop.server.db.models import Character
from talkloop.server.errors import NotFoundError
from talkloop.server.store.characters import CharacterRepo
from talkloop.server.store.native_tables import CharacterAvatar, CharacterOwner
from talkloop.server.store.pagination import Page, PageRequest, paginate
from talkloop.server.store.scoped import Scoped

MAX_SLUG_BASE_CHARS = 80


def new_slug(name: str) -> str:
    """`Captain Corvo` -> `captain-corvo-3f9a1c` (unique enough; the store still checks)."""
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:MAX_SLUG_BASE_CHARS]
    return f"{base or 'character'}-{secrets.token_hex(3)}"


class CharacterCatalog(Scoped):
    def __init__(self, repo: CharacterRepo) -> None:
        super().__init__(repo.session, repo.tenant_id)
        self.repo = repo

    def _visible(self, end_user_id: str | None) -> Select[Character]:
        query = self._select(Character)
        if end_user_id is None:
            return query
        owned = select(CharacterOwner.id).where(
            CharacterOwner.tenant_id == self.tenant_id,
            CharacterOwner.end_user_id != end_user_id,
        )
        return query.where(Character.id.not_in(owned))

    def visible(self, end_user_id: str | None) -> list[Character]:
        """Every character the end-user may use: shared ones and their own."""
        return list(self.session.scalars(self._visible(end_user_id).order_by(Character.slug)))

    def get(self, character_id: str, end_user_id: str | None) -> Character:
        query = self._visible(end_user_id).where(Character.id == character_id)
        row = self.session.scalars(query).first()
        if row is None:
            raise NotFoundError(f"no character with id {character_id!r}")
        return row

    def resolve(self, ref: str, end_user_id: str | None) -> Character:
        """By id or slug."""
        query = self._visible(end_user_id).where(or_(Character.id == ref, Character.slug == ref))
        row = self.session.scalars(query).first()
        if row is None:
            raise NotFoundError(f"no character with id {ref!r}")
        return row

    def page(self, end_user_id: str | None, page: PageRequest) -> Page[Character]:
        return paginate(self.session, self._visible(end_user_id), Character, page)

    def create(
        self, card: CharacterCard, end_user_id: str | None, slug: str | None = None
    ) -> Character:
        row = self.repo.create(slug or new_slug(card.name), card)
        if end_user_id is not None:
            self._add(CharacterOwner(id=row.id, end_user_id=end_user_id))
        return row

    def update(self, row: Character, card: CharacterCard) -> Character:
        row.card = card.to_spec()
        row.name = card.name
        self.session.flush()
        return row

    def delete(self, row: Character) -> None:
        self.session.delete(row)
        self.session.flush()

    def set_avatar(self, row: Character, data: bytes, media_type: str = "image/png") -> None:
        avatar = self._find(CharacterAvatar, row.id)
        if avatar is None:
            self._add(CharacterAvatar(id=row.id, media_type=media_type, data=data))
            return
        avatar.data, avatar.media_type = data, media_type
        self.session.flush()

    def avatar(self, row: Character) -> CharacterAvatar | None:
        return self._find(CharacterAvatar, row.id)
