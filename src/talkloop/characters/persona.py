"""User personas: who the user is in one conversation (name and a description for the prompt).

A persona is plain data; the conversation holds one. Macro substitution of `{{user}}` with the
persona name happens in prompt assembly, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from talkloop.characters.errors import CharacterError

DEFAULT_USER_NAME = "User"


class PersonaError(CharacterError, ValueError):
    """A persona's name or description is not usable."""


@dataclass(frozen=True)
class Persona:
    """The user's name and self-description, as the characters should see them."""

    name: str = DEFAULT_USER_NAME
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise PersonaError(f"persona name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.description, str):
            raise PersonaError(
                f"persona description must be a string, got {type(self.description).__name__}"
            )

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "description": self.description}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Persona:
        """Build a persona from `to_dict` output; a missing description means an empty one."""
        if not isinstance(data, dict) or "name" not in data:
            raise PersonaError(f"persona data must be a mapping with a 'name', got {data!r}")
        return cls(name=data["name"], description=data.get("description", ""))
