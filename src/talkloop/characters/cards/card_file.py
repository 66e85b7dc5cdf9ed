"""A card as read from a file: the character plus the bytes that travel with it.

`CardFile` pairs the `Character` with its container: the PNG image and the embedded asset
files (CHARX members, PNG `chara-ext-asset_` chunks), so a re-save loses nothing.
It does not parse anything itself.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from types import MappingProxyType

from talkloop.characters.model import CardAsset, Character

EMBEDDED_SCHEMES = ("embeded://", "embedded://")  # the spec's spelling, and the correct one
PNG_ASSET_SCHEME = "__asset:"


class CardFormat(StrEnum):
    """The container a card comes in."""

    JSON = "json"
    PNG = "png"
    CHARX = "charx"


class CardVersion(IntEnum):
    """The card spec version: V1 (flat), V2 `chara_card_v2`, V3 `chara_card_v3`."""

    V1 = 1
    V2 = 2
    V3 = 3


@dataclass(frozen=True)
class CardFile:
    """What `read_card` found: the character, its format and version, and its bytes.

    `image` is the PNG without its card chunks (PNG cards; for CHARX the embedded main icon
    when it is a PNG). `files` maps archive paths (`assets/icon/images/main.png`) to bytes.
    """

    character: Character
    format: CardFormat
    version: CardVersion
    image: bytes | None = None
    files: Mapping[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))

    def asset_bytes(self, asset: CardAsset) -> bytes | None:
        """The bytes behind `asset.uri`, or None when they are not in this file."""
        if asset.uri == "ccdefault:" and asset.type == "icon":
            return self.image
        return resolve_uri(asset.uri, self.files)


def embedded_path(uri: str) -> str | None:
    """`embeded://assets/x.png` (or `embedded://`, `__asset:`) -> `assets/x.png`."""
    for scheme in (*EMBEDDED_SCHEMES, PNG_ASSET_SCHEME):
        if uri.startswith(scheme):
            return uri[len(scheme) :]
    return None


def resolve_uri(uri: str, files: Mapping[str, bytes]) -> bytes | None:
    """Bytes for an embedded path found in `files` or a base64 `data:` URL; else None."""
    path = embedded_path(uri)
    if path is not None:
        return files.get(path)
    if uri.startswith("data:") and ";base64," in uri:
        try:
            return base64.b64decode(uri.split(";base64,", 1)[1], validate=True)
        except binascii.Error:
            return None
    return None
