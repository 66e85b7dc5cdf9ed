"""Shapes every native resource shares: the paginated list, and a deletion receipt.

Lists are `{"object": "list", "data": [...], "first_id", "last_id", "has_more"}` (OpenAI's
list shape); the next page is `?after=<last_id>`. Resource schemas live beside their routes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from talkloop.server.store.pagination import Page

ItemT = TypeVar("ItemT", bound=BaseModel)


class Strict(BaseModel):
    """Request bodies: unknown fields are refused (a typo should not pass silently)."""

    model_config = ConfigDict(extra="forbid")


class ListPage(BaseModel, Generic[ItemT]):
    object: Literal["list"] = "list"
    data: list[ItemT]
    first_id: str | None
    last_id: str | None
    has_more: bool

    @classmethod
    def of(cls, page: Page[Any], public: Callable[[Any], ItemT]) -> ListPage[ItemT]:
        items = [public(row) for row in page.rows]
        first = page.rows[0].id if page.rows else None
        last = page.rows[-1].id if page.rows else None
        return cls(data=items, first_id=first, last_id=last, has_more=page.has_more)


class Deleted(BaseModel):
    id: str
    object: str
    deleted: Literal[True] = True
