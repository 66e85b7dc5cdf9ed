"""End-users of one tenant, named by the tenant's own ids (OpenAI `user`)."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError

from talkloop.server.db.models import EndUser
from talkloop.server.store.scoped import Scoped


class EndUserRepo(Scoped):
    def get(self, end_user_id: str) -> EndUser:
        return self._get(EndUser, end_user_id, "end-user")

    def find(self, external_id: str) -> EndUser | None:
        query = self._select(EndUser).where(EndUser.external_id == external_id)
        return self.session.scalars(query).first()

    def ensure(self, external_id: str) -> EndUser:
        """The end-user the tenant calls `external_id`, created on first sight."""
        found = self.find(external_id)
        if found is not None:
            return found
        try:
            with self.session.begin_nested():
                return self._add(EndUser(external_id=external_id))
        except IntegrityError:  # another request created it first
            created = self.find(external_id)
            if created is None:
                raise
            return created
