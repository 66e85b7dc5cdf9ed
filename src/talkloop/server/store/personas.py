"""User personas of one tenant, each owned by one end-user (or by the tenant itself when
created without an end-user), and the persona each conversation uses."""

from __future__ import annotations

from sqlalchemy import Select

from talkloop.characters.persona import Persona as PersonaData
from talkloop.server.errors import NotFoundError
from talkloop.server.store.native_tables import ConversationPersona, Persona
from talkloop.server.store.pagination import Page, PageRequest, paginate
from talkloop.server.store.scoped import Scoped


class PersonaRepo(Scoped):
    def _owned(self, end_user_id: str | None) -> Select[Persona]:
        query = self._select(Persona)
        if end_user_id is not None:
            query = query.where(Persona.end_user_id == end_user_id)
        return query

    def create(self, end_user_id: str | None, name: str, description: str) -> Persona:
        return self._add(Persona(end_user_id=end_user_id, name=name, description=description))

    def get(self, persona_id: str, end_user_id: str | None) -> Persona:
        row = self.session.scalars(self._owned(end_user_id).where(Persona.id == persona_id)).first()
        if row is None:
            raise NotFoundError(f"no persona with id {persona_id!r}")
        return row

    def page(self, end_user_id: str | None, page: PageRequest) -> Page[Persona]:
        return paginate(self.session, self._owned(end_user_id), Persona, page)

    def update(self, row: Persona, name: str | None, description: str | None) -> Persona:
        if name is not None:
            row.name = name
        if description is not None:
            row.description = description
        self.session.flush()
        return row

    def delete(self, row: Persona) -> None:
        self.session.delete(row)
        self.session.flush()

    def use_in(self, conversation_id: str, persona_id: str | None) -> None:
        link = self._find(ConversationPersona, conversation_id)
        if link is None:
            self._add(ConversationPersona(id=conversation_id, persona_id=persona_id))
        else:
            link.persona_id = persona_id
            self.session.flush()

    def persona_id_of(self, conversation_id: str) -> str | None:
        link = self._find(ConversationPersona, conversation_id)
        return None if link is None else link.persona_id

    def for_conversation(self, conversation_id: str) -> PersonaData:
        """The persona a conversation's prompt uses (the default one when none is set)."""
        persona_id = self.persona_id_of(conversation_id)
        row = self._find(Persona, persona_id) if persona_id else None
        if row is None:
            return PersonaData()
        return PersonaData(row.name, row.description)
