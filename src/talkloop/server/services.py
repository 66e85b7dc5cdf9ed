"""`Services`: what one running app holds (settings, database, models, ledger, drain gate).

Built by the app's lifespan and reached by routes through `deps.ServicesDep`; other
subsystems (limits, metrics) add their long-lived objects here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from talkloop.backends.base import ModelBackend
from talkloop.server.db.database import Database
from talkloop.server.ledger import UsageLedger
from talkloop.server.middleware import DrainGate
from talkloop.server.model_registry import ModelRegistry
from talkloop.server.settings import Settings

if TYPE_CHECKING:  # auth reaches Services through deps
    from talkloop.server.auth import KeyCache


@dataclass(frozen=True)
class Services:
    settings: Settings
    db: Database
    models: ModelRegistry
    ledger: UsageLedger
    gate: DrainGate
    owned_backends: tuple[ModelBackend, ...] = field(default=())  # closed at shutdown
    key_cache: KeyCache | None = None  # authentications kept between requests (SQLite)
