"""`/api/world_books`: CRUD of standalone lorebooks (`lorebook_v3` JSON, or SillyTavern's
world-info export on input), and attaching them to characters.

A book attached to a character joins the lore of every prompt of that character.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from talkloop.characters.lorebook import LorebookFileError, lorebook_from_json, lorebook_to_json
from talkloop.characters.model import Lorebook
from talkloop.server.errors import BadRequestError
from talkloop.server.native_api.deps import CallerDep, PageDep
from talkloop.server.native_api.schemas import Deleted, ListPage, Strict
from talkloop.server.store.native_tables import WorldBook

router = APIRouter(tags=["world books"])

EXAMPLE_BOOK = {
    "spec": "lorebook_v3",
    "data": {"name": "Saltmarrow", "entries": [{"keys": ["harbour"], "content": "Fog rolls in."}]},
}


class WorldBookCreate(Strict):
    book: dict[str, Any] = Field(description="`lorebook_v3` JSON", examples=[EXAMPLE_BOOK])
    name: str | None = Field(default=None, max_length=200, description="default: the book's")


class WorldBookUpdate(Strict):
    book: dict[str, Any] | None = None
    name: str | None = Field(default=None, max_length=200)


class WorldBookPublic(BaseModel):
    id: str
    object: Literal["world_book"] = "world_book"
    name: str
    book: dict[str, Any] = Field(description="`lorebook_v3` JSON")
    created_at: datetime
    updated_at: datetime


def world_book_public(row: WorldBook) -> WorldBookPublic:
    book = lorebook_to_json(Lorebook.from_spec(row.book))
    return WorldBookPublic(
        id=row.id, name=row.name, book=book, created_at=row.created_at, updated_at=row.updated_at
    )


def parse_book(raw: dict[str, Any]) -> Lorebook:
    try:
        return lorebook_from_json(raw)
    except LorebookFileError as exc:
        raise BadRequestError(
            f"invalid world book: {exc}", param="book", code="invalid_book"
        ) from None


@router.post("/world_books", status_code=201)
def create_world_book(body: WorldBookCreate, caller: CallerDep) -> WorldBookPublic:
    row = caller.store.world_books.create(parse_book(body.book), caller.end_user_id, body.name)
    caller.commit()
    return world_book_public(row)


@router.get("/world_books")
def list_world_books(caller: CallerDep, page: PageDep) -> ListPage[WorldBookPublic]:
    found = caller.store.world_books.page(caller.end_user_id, page)
    return ListPage[WorldBookPublic].of(found, world_book_public)


@router.get("/world_books/{book_id}")
def get_world_book(book_id: str, caller: CallerDep) -> WorldBookPublic:
    return world_book_public(caller.store.world_books.get(book_id, caller.end_user_id))


@router.patch("/world_books/{book_id}")
def update_world_book(book_id: str, body: WorldBookUpdate, caller: CallerDep) -> WorldBookPublic:
    row = caller.store.world_books.get(book_id, caller.end_user_id)
    book = parse_book(body.book) if body.book is not None else None
    caller.store.world_books.update(row, book, body.name)
    caller.commit()
    return world_book_public(row)


@router.delete("/world_books/{book_id}")
def delete_world_book(book_id: str, caller: CallerDep) -> Deleted:
    caller.store.world_books.delete(caller.store.world_books.get(book_id, caller.end_user_id))
    caller.commit()
    return Deleted(id=book_id, object="world_book")


@router.get("/characters/{character_id}/world_books")
def list_attached(character_id: str, caller: CallerDep, page: PageDep) -> ListPage[WorldBookPublic]:
    character = caller.store.catalog.get(character_id, caller.end_user_id)
    found = caller.store.world_books.page_attached(character.id, caller.end_user_id, page)
    return ListPage[WorldBookPublic].of(found, world_book_public)


@router.put("/characters/{character_id}/world_books/{book_id}", status_code=204)
def attach_world_book(character_id: str, book_id: str, caller: CallerDep) -> Response:
    character = caller.store.catalog.get(character_id, caller.end_user_id)
    book = caller.store.world_books.get(book_id, caller.end_user_id)
    caller.store.world_books.attach(character, book)
    caller.commit()
    return Response(status_code=204)


@router.delete("/characters/{character_id}/world_books/{book_id}", status_code=204)
def detach_world_book(character_id: str, book_id: str, caller: CallerDep) -> Response:
    character = caller.store.catalog.get(character_id, caller.end_user_id)
    book = caller.store.world_books.get(book_id, caller.end_user_id)
    caller.store.world_books.detach(character, book)
    caller.commit()
    return Response(status_code=204)
