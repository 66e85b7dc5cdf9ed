"""Token logprobs in OpenAI's shapes: chat (`content` with bytes) and legacy completions.

Token text comes from the backend's tokenizer: byte-level BPE spellings (`Ġhello`) and
SentencePiece byte tokens (`<0x0A>`) are turned back into the exact bytes they stand for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from typing import Any, Protocol

from talkloop.backends.base import ModelBackend
from talkloop.backends.engine_backend import EngineBackend
from talkloop.engine.outputs import TokenLogprob
from talkloop.engine.tokenizer import Tokenizer
from talkloop.server.errors import BadRequestError

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes(Protocol):
    def __call__(self, token_id: int) -> bytes: ...


@cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars, strict=True)}


def vocab_token_bytes(token: str) -> bytes:
    """The bytes a vocabulary entry stands for."""
    match = _BYTE_TOKEN.fullmatch(token)
    if match:
        return bytes([int(match.group(1), 16)])
    decoder = _byte_level_decoder()
    if all(char in decoder for char in token):
        return bytes(decoder[char] for char in token)
    return token.replace("\u2581", " ").encode("utf-8")


def _tokenizer_bytes(tokenizer: Tokenizer) -> TokenBytes:
    def token_bytes(token_id: int) -> bytes:
        return vocab_token_bytes(tokenizer.id_to_token(token_id) or "")

    return token_bytes


def token_bytes_for(backend: ModelBackend) -> TokenBytes:
    if isinstance(backend, EngineBackend):
        return _tokenizer_bytes(backend.tokenizer)
    raise BadRequestError(
        f"logprobs are not available for model {backend.model_name!r}", param="logprobs"
    )


def _entry(token_id: int, logprob: float, token_bytes: TokenBytes) -> dict[str, Any]:
    raw = token_bytes(token_id)
    return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(items: Sequence[TokenLogprob], token_bytes: TokenBytes) -> dict[str, Any]:
    """`{"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}`."""
    content = [
        {
            **_entry(item.token_id, item.logprob, token_bytes),
            "top_logprobs": [_entry(tid, lp, token_bytes) for tid, lp in item.top],
        }
        for item in items
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    items: Sequence[TokenLogprob], token_bytes: TokenBytes, text_offset: int
) -> dict[str, Any]:
    """Legacy: parallel lists of tokens, logprobs, top logprobs and text offsets."""
    tokens = [token_bytes(item.token_id).decode("utf-8", "replace") for item in items]
    offsets, position = [], text_offset
    for token in tokens:
        offsets.append(position)
        position += len(token)
    top = [
        {token_bytes(tid).decode("utf-8", "replace"): lp for tid, lp in item.top} for item in items
    ]
    return {
        "tokens": tokens,
        "token_logprobs": [item.logprob for item in items],
        "top_logprobs": top,
        "text_offset": offsets,
    }
