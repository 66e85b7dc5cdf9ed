"""FastAPI dependencies for what every route may need: services, settings, a DB session.

`SessionDep` is a session that closes when the handler returns (before a streamed body
runs), so a long stream never holds a pooled connection; streaming code opens its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from talkloop.server.errors import ShuttingDownError
from talkloop.server.services import Services
from talkloop.server.settings import Settings


async def get_services(request: Request) -> Services:  # async: no worker-thread hop
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        raise ShuttingDownError("the server is starting or stopping; retry shortly")
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_settings(services: ServicesDep) -> Settings:
    return services.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_db(services: ServicesDep) -> Iterator[Session]:
    with services.db.new_session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db, scope="function")]
