"""`/api/personas`: the end-user's personas (who they are in a chat: a name and a
description the characters see). Each end-user sees only their own."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from talkloop.server.native_api.deps import CallerDep, PageDep
from talkloop.server.native_api.schemas import Deleted, ListPage, Strict
from talkloop.server.store.native_tables import Persona

router = APIRouter(prefix="/personas", tags=["personas"])


class PersonaCreate(Strict):
    name: str = Field(min_length=1, max_length=200, pattern=r"\S", examples=["Ada"])
    description: str = Field(default="", max_length=20_000, examples=["A travelling botanist."])


class PersonaUpdate(Strict):
    name: str | None = Field(default=None, min_length=1, max_length=200, pattern=r"\S")
    description: str | None = Field(default=None, max_length=20_000)


class PersonaPublic(BaseModel):
    id: str
    object: Literal["persona"] = "persona"
    name: str
    description: str
    created_at: datetime
    updated_at: datetime


def persona_public(row: Persona) -> PersonaPublic:
    return PersonaPublic(
        id=row.id,
        name=row.name,
        description=row.description,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


@router.post("", status_code=201)
def create_persona(body: PersonaCreate, caller: CallerDep) -> PersonaPublic:
    row = caller.store.personas.create(caller.end_user_id, body.name, body.description)
    caller.commit()
    return persona_public(row)


@router.get("")
def list_personas(caller: CallerDep, page: PageDep) -> ListPage[PersonaPublic]:
    found = caller.store.personas.page(caller.end_user_id, page)
    return ListPage[PersonaPublic].of(found, persona_public)


@router.get("/{persona_id}")
def get_persona(persona_id: str, caller: CallerDep) -> PersonaPublic:
    return persona_public(caller.store.personas.get(persona_id, caller.end_user_id))


@router.patch("/{persona_id}")
def update_persona(persona_id: str, body: PersonaUpdate, caller: CallerDep) -> PersonaPublic:
    row = caller.store.personas.get(persona_id, caller.end_user_id)
    caller.store.personas.update(row, body.name, body.description)
    caller.commit()
    return persona_public(row)


@router.delete("/{persona_id}")
def delete_persona(persona_id: str, caller: CallerDep) -> Deleted:
    caller.store.personas.delete(caller.store.personas.get(persona_id, caller.end_user_id))
    caller.commit()
    return Deleted(id=persona_id, object="persona")
