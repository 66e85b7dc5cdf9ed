"""Dependencies of the native API: the caller's `NativeStore` and end-user, and paging.

`CallerDep` carries the tenant-scoped store and the end-user's row id (None when the request
names no end-user: it then acts for the whole tenant). Handlers commit through `caller.commit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query

from talkloop.server.auth import Principal, PrincipalDep
from talkloop.server.deps import SessionDep
from talkloop.server.store.native import NativeStore
from talkloop.server.store.pagination import DEFAULT_PAGE_ROWS, MAX_PAGE_ROWS, PageRequest


@dataclass(frozen=True)
class Caller:
    principal: Principal
    store: NativeStore
    end_user_id: str | None  # the end_users row id

    def commit(self) -> None:
        self.store.commit()


def get_caller(principal: PrincipalDep, session: SessionDep) -> Caller:
    store = NativeStore(session, principal.tenant_id)
    end_user_id = None
    if principal.end_user is not None:
        end_user_id = store.end_users.ensure(principal.end_user).id
    return Caller(principal, store, end_user_id)


CallerDep = Annotated[Caller, Depends(get_caller)]


def page_request(
    limit: Annotated[
        int, Query(ge=1, le=MAX_PAGE_ROWS, description="rows per page")
    ] = DEFAULT_PAGE_ROWS,
    after: Annotated[str | None, Query(description="the `last_id` of the previous page")] = None,
) -> PageRequest:
    return PageRequest(limit, after)


PageDep = Annotated[PageRequest, Depends(page_request)]
