"""`GET /v1/models`: the served models, then the caller's characters as `character/<slug>`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from talkloop.server.auth import StoreDep
from talkloop.server.deps import ServicesDep
from talkloop.server.model_registry import CHARACTER_PREFIX

router = APIRouter()
OWNED_BY = "talkloop"


def model_entry(model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


@router.get("/models")
def list_models(services: ServicesDep, store: StoreDep) -> dict[str, Any]:
    data = [model_entry(b.model_name, 0, OWNED_BY) for b in services.models.backends]
    data += [
        model_entry(f"{CHARACTER_PREFIX}{row.slug}", int(row.created_at.timestamp()), row.tenant_id)
        for row in store.characters.all()
    ]
    return {"object": "list", "data": data}
