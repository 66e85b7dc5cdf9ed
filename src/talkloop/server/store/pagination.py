"""Keyset pagination for every list: `limit` rows after the row whose id is `after`.

Rows come oldest first, ordered by `(created_at, id)`; the cursor is the last id a client
saw. The cursor row is looked up through the same (tenant-scoped) query, so a cursor naming
another tenant's row is refused like an unknown one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, tuple_
from sqlalchemy.orm import Session

from talkloop.server.errors import BadRequestError

RowT = TypeVar("RowT")
MAX_PAGE_ROWS = 100
DEFAULT_PAGE_ROWS = 20


@dataclass(frozen=True)
class PageRequest:
    limit: int = DEFAULT_PAGE_ROWS
    after: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_PAGE_ROWS:
            raise BadRequestError(
                f"limit must be between 1 and {MAX_PAGE_ROWS}, got {self.limit}", param="limit"
            )


@dataclass(frozen=True)
class Page(Generic[RowT]):
    rows: Sequence[RowT]
    has_more: bool


def paginate(
    session: Session, query: Select[Any], model: type[Any], page: PageRequest
) -> Page[Any]:
    """One page of `query` (already scoped) over `model`, which has `created_at` and `id`."""
    key = tuple_(model.created_at, model.id)
    if page.after is not None:
        cursor = session.scalars(query.where(model.id == page.after)).first()
        if cursor is None:
            raise BadRequestError(f"unknown cursor {page.after!r}", param="after")
        query = query.where(key > tuple_(cursor.created_at, cursor.id))
    rows = session.scalars(query.order_by(model.created_at, model.id).limit(page.limit + 1)).all()
    return Page(rows[: page.limit], len(rows) > page.limit)
