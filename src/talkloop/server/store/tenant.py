"""`TenantStore`: every repository of one tenant, bound to one session.

Routes reach data only through a `TenantStore` built from the caller's credentials (see
`auth.StoreDep`). To add a noun: write a `Scoped` subclass in its own module and attach it here.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from talkloop.server.store.characters import CharacterRepo
from talkloop.server.store.conversations import ConversationRepo
from talkloop.server.store.end_users import EndUserRepo
from talkloop.server.store.keys import KeyRepo
from talkloop.server.store.usage import UsageRepo


class TenantStore:
    def __init__(self, session: Session, tenant_id: str) -> None:
        self.session = session
        self.tenant_id = tenant_id
        self.keys = KeyRepo(session, tenant_id)
        self.end_users = EndUserRepo(session, tenant_id)
        self.characters = CharacterRepo(session, tenant_id)
        self.conversations = ConversationRepo(session, tenant_id)
        self.usage = UsageRepo(session, tenant_id)

    def commit(self) -> None:
        self.session.commit()
