"""`GET /v1/models`: the served models, then the caller's characters as `character/<slug>`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from talkloop.server.auth import PrincipalDep
from talkloop.server.deps import ServicesDep, SessionDep
from talkloop.server.model_registry import CHARACTER_PREFIX
from talkloop.server.openai_api.character_chat import end_user_row_id
from talkloop.server.store.native import NativeStore

router = APIRouter()
OWNED_BY = "talkloop"


def model_entry(model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


@router.get("/models")
def list_models(
    services: ServicesDep, principal: PrincipalDep, session: SessionDep
) -> dict[str, Any]:
    """Served models, then the characters this caller's end-user may chat with."""
    store = NativeStore(session, principal.tenant_id)
    rows = store.catalog.visible(end_user_row_id(store, principal))
    data = [model_entry(b.model_name, 0, OWNED_BY) for b in services.models.backends]
    data += [
        model_entry(f"{CHARACTER_PREFIX}{row.slug}", int(row.created_at.timestamp()), row.tenant_id)
        for row in rows
    ]
    return {"object": "list", "data": data}
