"""`Scoped`: the base of every tenant-scoped repository; the one place tenant filters are built.

A repository selects through `_select` and loads through `_get`, so every statement it runs
carries `tenant_id = :tenant`. A row of another tenant is reported exactly like a missing one.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from talkloop.server.db.base import Base
from talkloop.server.errors import NotFoundError

RowT = TypeVar("RowT", bound=Base)


class Scoped:
    """Rows of one tenant; subclasses add the methods of one noun."""

    def __init__(self, session: Session, tenant_id: str) -> None:
        self.session = session
        self.tenant_id = tenant_id

    def _select(self, model: type[RowT]) -> Select[RowT]:
        tenant_column: Any = model.tenant_id  # type: ignore[attr-defined]
        return select(model).where(tenant_column == self.tenant_id)

    def _find(self, model: type[RowT], row_id: str) -> RowT | None:
        row_column: Any = model.id  # type: ignore[attr-defined]
        return self.session.scalars(self._select(model).where(row_column == row_id)).first()

    def _get(self, model: type[RowT], row_id: str, what: str) -> RowT:
        """The row, or NotFoundError naming `what` (also when another tenant owns it)."""
        row = self._find(model, row_id)
        if row is None:
            raise NotFoundError(f"no {what} with id {row_id!r}")
        return row

    def _add(self, row: RowT) -> RowT:
        row.tenant_id = self.tenant_id  # type: ignore[attr-defined]
        self.session.add(row)
        self.session.flush()
        return row
