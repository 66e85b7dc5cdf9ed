"""`/health` (the process is alive) and `/ready` (model loaded, database reachable)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from talkloop.server.services import Services

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Not ready: `checks` names what is not"}})
async def ready(request: Request) -> JSONResponse:
    services: Services | None = getattr(request.app.state, "services", None)
    checks = {"database": False, "model": False}
    if services is not None and not services.gate.draining:
        checks["database"] = await asyncio.to_thread(services.db.ping)
        models = [await backend.is_ready() for backend in services.models.backends]
        checks["model"] = all(models)
    ok = all(checks.values())
    body = {"status": "ready" if ok else "not_ready", "checks": checks}
    return JSONResponse(body, status_code=200 if ok else 503)
