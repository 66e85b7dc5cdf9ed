"""Which backend serves a request's `model`: the one function every route resolves through.

Plain names select a backend; `character/<id or slug>` selects one of the caller's tenant's
characters (another tenant's is not found) on the default backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from talkloop.backends.base import ModelBackend
from talkloop.characters.model import Character as CharacterCard
from talkloop.server.errors import NotFoundError
from talkloop.server.store import TenantStore

CHARACTER_PREFIX = "character/"


def is_character(model: str) -> bool:
    return model.startswith(CHARACTER_PREFIX)


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # as the client named it (echoed in responses and metered)
    backend: ModelBackend
    character_id: str | None = None
    character: CharacterCard | None = None


class ModelRegistry:
    def __init__(self, backends: Sequence[ModelBackend]) -> None:
        if not backends:
            raise ValueError("a model registry needs at least one backend")
        self._backends = {backend.model_name: backend for backend in backends}
        self.default = backends[0]

    @property
    def backends(self) -> list[ModelBackend]:
        return list(self._backends.values())

    def resolve(self, name: str, store: TenantStore) -> ResolvedModel:
        """The backend (and character) for `name`; NotFoundError names what exists."""
        if is_character(name):
            return self._resolve_character(name, store)
        return self.resolve_backend(name)

    def resolve_backend(self, name: str) -> ResolvedModel:
        """The backend named `name` (no database needed); NotFoundError names what exists."""
        backend = self._backends.get(name)
        if backend is None:
            raise NotFoundError(
                f"the model {name!r} does not exist; available: {sorted(self._backends)} "
                f"or {CHARACTER_PREFIX}<character id>",
                param="model",
                code="model_not_found",
            )
        return ResolvedModel(name, backend)

    def _resolve_character(self, name: str, store: TenantStore) -> ResolvedModel:
        row = store.characters.resolve(name.removeprefix(CHARACTER_PREFIX))
        if row is None:
            raise NotFoundError(
                f"the model {name!r} does not exist: no such character",
                param="model",
                code="model_not_found",
            )
        return ResolvedModel(name, self.default, row.id, store.characters.card(row))
