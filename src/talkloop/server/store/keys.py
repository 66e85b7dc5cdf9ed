"""API keys of one tenant: create (returns the secret once), list, revoke."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from talkloop.server.db.base import utcnow
from talkloop.server.db.models import ApiKey, KeyScope
from talkloop.server.keys import generate_api_key, hash_api_key, key_prefix
from talkloop.server.store.scoped import Scoped


@dataclass(frozen=True)
class CreatedKey:
    row: ApiKey
    secret: str  # shown once; only its hash is stored


class KeyRepo(Scoped):
    def create(self, name: str = "", scope: KeyScope = KeyScope.USER) -> CreatedKey:
        return self.import_secret(generate_api_key(), name, scope)

    def import_secret(self, secret: str, name: str, scope: KeyScope) -> CreatedKey:
        """Store a key whose secret was chosen elsewhere (the bootstrap admin key)."""
        row = ApiKey(
            name=name, scope=scope, prefix=key_prefix(secret), key_hash=hash_api_key(secret)
        )
        return CreatedKey(self._add(row), secret)

    def get(self, key_id: str) -> ApiKey:
        return self._get(ApiKey, key_id, "API key")

    def all(self) -> Sequence[ApiKey]:
        return self.session.scalars(self._select(ApiKey).order_by(ApiKey.created_at)).all()

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke now; every replica refuses it on its next request (the auth epoch moves)."""
        row = self.get(key_id)
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            self.session.flush()
        return row
