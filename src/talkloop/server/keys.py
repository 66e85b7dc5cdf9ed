"""API key secrets: generation (256 random bits), visible prefix, SHA-256 hash.

Only the hash is stored; the secret is shown once at creation. Looking a key up by its hash
needs no constant-time compare: the hash of a guess says nothing about the real key.
"""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "tl-"
VISIBLE_CHARS = 8  # after KEY_PREFIX, shown in listings and logs
MAX_KEY_CHARS = 256


def generate_api_key() -> str:
    """`tl-` + 43 URL-safe characters carrying 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_prefix(secret: str) -> str:
    """The part of a key that may be displayed, e.g. `tl-AbCdEfGh`."""
    return secret[: len(KEY_PREFIX) + VISIBLE_CHARS]


def hash_api_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()
