"""`/api/characters`: CRUD, import and export of card files (PNG, JSON, CHARX), the avatar,
and the world books attached to a character.

A card given as JSON may be any version (V1 flat, V2, V3); it is stored as V3 `data`. A bad
card is refused with 400 naming the field or chunk at fault, and nothing is stored.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from talkloop.characters.cards import CardFile, CardFormat, read_card, save_card
from talkloop.characters.cards.card_file import embedded_path
from talkloop.characters.errors import CardFormatError
from talkloop.characters.model import Character as CharacterCard
from talkloop.server.db.models import Character
from talkloop.server.errors import BadRequestError, NotFoundError
from talkloop.server.native_api.deps import CallerDep, PageDep
from talkloop.server.native_api.schemas import Deleted, ListPage, Strict
from talkloop.server.native_api.uploads import read_upload

router = APIRouter(prefix="/characters", tags=["characters"])

EXAMPLE_CARD = {
    "spec": "chara_card_v3",
    "spec_version": "3.0",
    "data": {
        "name": "Mira",
        "first_mes": "Hello, traveller.",
        "description": "A lighthouse keeper.",
    },
}
MEDIA_TYPES = {
    CardFormat.PNG: "image/png",
    CardFormat.JSON: "application/json",
    CardFormat.CHARX: "application/zip",
}


class CharacterCreate(Strict):
    card: dict[str, Any] = Field(
        description="a card as JSON: V3/V2 `{spec, data}` or V1 flat", examples=[EXAMPLE_CARD]
    )
    slug: str | None = Field(default=None, min_length=1, max_length=100, pattern=r"^[\w.-]+$")


class CharacterUpdate(Strict):
    card: dict[str, Any] = Field(description="the whole new card, any version")


class CharacterPublic(BaseModel):
    id: str
    object: Literal["character"] = "character"
    slug: str
    name: str
    card: dict[str, Any] = Field(description="the card's V3 `data`")
    created_at: datetime
    updated_at: datetime


def character_public(row: Character) -> CharacterPublic:
    return CharacterPublic(
        id=row.id,
        slug=row.slug,
        name=row.name,
        card=row.card,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def card_from_json(card: dict[str, Any]) -> CharacterCard:
    return parse_card(json.dumps(card).encode(), CardFormat.JSON).character


def parse_card(raw: bytes, card_format: CardFormat | None = None) -> CardFile:
    try:
        return read_card(raw, format=card_format)
    except CardFormatError as exc:
        raise BadRequestError(
            f"invalid character card: {exc}", param="card", code="invalid_card"
        ) from None


def avatar_files(card: CharacterCard, image: bytes | None) -> dict[str, bytes]:
    """The CHARX member the main icon points at (other embedded assets are not kept)."""
    asset = card.avatar_asset
    path = embedded_path(asset.uri) if asset is not None else None
    return {path: image} if path and image else {}


@router.post("", status_code=201)
def create_character(body: CharacterCreate, caller: CallerDep) -> CharacterPublic:
    card = card_from_json(body.card)
    row = caller.store.catalog.create(card, caller.end_user_id, body.slug)
    caller.commit()
    return character_public(row)


@router.post("/import", status_code=201)
async def import_character(request: Request, caller: CallerDep) -> CharacterPublic:
    """Upload a PNG, JSON or CHARX card: as the `file` field of a multipart form, or as the
    raw body. A card's embedded image becomes the avatar."""
    upload = await read_upload(request)
    card_file = parse_card(upload.data)

    def store() -> CharacterPublic:
        row = caller.store.catalog.create(card_file.character, caller.end_user_id)
        if card_file.image:
            caller.store.catalog.set_avatar(row, card_file.image)
        caller.commit()
        return character_public(row)

    return await asyncio.to_thread(store)


@router.get("")
def list_characters(caller: CallerDep, page: PageDep) -> ListPage[CharacterPublic]:
    found = caller.store.catalog.page(caller.end_user_id, page)
    return ListPage[CharacterPublic].of(found, character_public)


@router.get("/{character_id}")
def get_character(character_id: str, caller: CallerDep) -> CharacterPublic:
    return character_public(caller.store.catalog.get(character_id, caller.end_user_id))


@router.put("/{character_id}")
def update_character(
    character_id: str, body: CharacterUpdate, caller: CallerDep
) -> CharacterPublic:
    row = caller.store.catalog.get(character_id, caller.end_user_id)
    caller.store.catalog.update(row, card_from_json(body.card))
    caller.commit()
    return character_public(row)


@router.delete("/{character_id}")
def delete_character(character_id: str, caller: CallerDep) -> Deleted:
    row = caller.store.catalog.get(character_id, caller.end_user_id)
    caller.store.catalog.delete(row)
    caller.commit()
    return Deleted(id=character_id, object="character")


@router.get(
    "/{character_id}/export",
    response_class=Response,
    responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}},
)
def export_character(
    character_id: str,
    caller: CallerDep,
    format: Annotated[CardFormat, Query()] = CardFormat.PNG,
    version: Annotated[int, Query(ge=1, le=3, description="card spec version")] = 3,
) -> Response:
    """The card file; PNG and CHARX carry the avatar when there is one."""
    row = caller.store.catalog.get(character_id, caller.end_user_id)
    avatar = caller.store.catalog.avatar(row)
    card = caller.store.characters.card(row)
    image = avatar.data if avatar else None
    try:
        data = save_card(card, format, version, image=image, files=avatar_files(card, image))
    except CardFormatError as exc:
        raise BadRequestError(
            f"cannot export as {format} V{version}: {exc}", param="format"
        ) from None
    filename = f"{row.slug}.{format.value}"
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    return Response(data, media_type=MEDIA_TYPES[format], headers=headers)


@router.get(
    "/{character_id}/avatar",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 404: {"description": "no avatar"}},
)
def get_avatar(character_id: str, caller: CallerDep) -> Response:
    row = caller.store.catalog.get(character_id, caller.end_user_id)
    avatar = caller.store.catalog.avatar(row)
    if avatar is None:
        raise NotFoundError(f"character {character_id!r} has no avatar", code="no_avatar")
    return Response(avatar.data, media_type=avatar.media_type)


@router.put("/{character_id}/avatar", status_code=204, response_class=Response)
async def set_avatar(character_id: str, request: Request, caller: CallerDep) -> Response:
    """Upload a PNG (the raw body, or the `file` field of a multipart form)."""
    upload = await read_upload(request)
    if not upload.data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise BadRequestError("the avatar must be a PNG image", param="file")

    def store() -> None:
        row = caller.store.catalog.get(character_id, caller.end_user_id)
        caller.store.catalog.set_avatar(row, upload.data)
        caller.commit()

    await asyncio.to_thread(store)
    return Response(status_code=204)
