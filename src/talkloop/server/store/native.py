"""`NativeStore`: the `TenantStore` plus the repositories the native API (`/api`) adds.

Built from the caller's credentials like `TenantStore` (see `native_api.deps`), so every
query it runs is scoped to the caller's tenant.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from talkloop.server.store.character_catalog import CharacterCatalog
from talkloop.server.store.feedback import FeedbackRepo
from talkloop.server.store.message_tree import MessageTree
from talkloop.server.store.personas import PersonaRepo
from talkloop.server.store.rooms import RoomRepo
from talkloop.server.store.tenant import TenantStore
from talkloop.server.store.world_books import WorldBookRepo


class NativeStore(TenantStore):
    def __init__(self, session: Session, tenant_id: str) -> None:
        super().__init__(session, tenant_id)
        self.catalog = CharacterCatalog(self.characters)
        self.world_books = WorldBookRepo(session, tenant_id)
        self.personas = PersonaRepo(session, tenant_id)
        self.tree = MessageTree(self.conversations)
        self.rooms = RoomRepo(self.conversations)
        self.feedback = FeedbackRepo(session, tenant_id)
