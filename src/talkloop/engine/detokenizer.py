"""Streaming text for one sequence: token ids in, text deltas out, one token at a time.

Decodes only a small window of recent ids (vLLM's prefix/read offsets), so a step costs O(1)
amortised, and holds back text that ends in an unfinished UTF-8 character. Stop strings are
not matched here (the output processor does that).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"

# Prompt ids kept as left context, so the first generated token decodes as it does in the
# full text (a SentencePiece "▁the" alone loses its space).
NUM_CONTEXT_TOKENS = 5

# A UTF-8 character is at most 4 bytes, so at most 4 byte tokens; past this many held tokens the
# text is really invalid bytes, and the held window is committed to keep each step O(1).
MAX_HELD_TOKENS = 8
_NUM_SETTLING_TOKENS = 4


class TextDecoder(Protocol):
    """What the detokenizer needs of a tokenizer (`talkloop.engine.tokenizer.Tokenizer` fits)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Text deltas for one sequence; their concatenation equals the full decode.

    Invariant: `_prefix_text` == decode(window[prefix_offset:read_offset]) has been emitted
    (or belongs to the prompt); ids from `read_offset` on are not emitted yet.
    NOTE: with no prompt context, the deltas concatenate to `decode(all_ids)`; with prompt ids
    they concatenate to what those ids add to the prompt's text. A SentencePiece byte-fallback
    run that is invalid UTF-8 decodes non-locally (all its bytes become U+FFFD); only that
    case can differ from the full decode.
    """

    def __init__(
        self,
        decoder: TextDecoder,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._decoder = decoder
        self._skip_special_tokens = skip_special_tokens
        self._window: list[int] = list(prompt_token_ids[-NUM_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._window)
        self._prefix_text = self._decode(self._window)

    def step(self, token_id: int) -> str:
        """The new text that `token_id` completes; "" while a character is still unfinished."""
        self._window.append(token_id)
        text = self._decode(self._window[self._prefix_offset :])
        if text.endswith(REPLACEMENT_CHAR) or len(text) <= len(self._prefix_text):
            return self._commit_invalid_bytes(text)
        delta = text[len(self._prefix_text) :]
        self._advance(len(self._window))
        return delta

    def flush(self) -> str:
        """Text still held back at the end of the sequence (an unfinished character as U+FFFD)."""
        text = self._decode(self._window[self._prefix_offset :])
        delta = text[len(self._prefix_text) :]
        self._advance(len(self._window))
        return delta

    def _decode(self, ids: Sequence[int]) -> str:
        return self._decoder.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _advance(self, read_offset: int) -> None:
        """Everything before `read_offset` is emitted; the last emitted ids become the context."""
        del self._window[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, read_offset - self._read_offset
        self._prefix_text = self._decode(self._window[: self._read_offset])

    def _commit_invalid_bytes(self, text: str) -> str:
        """Emit held text once it is certainly final (only for long runs of invalid bytes).

        A cut `k` is final when decoding both sides apart gives the full text and at least
        4 ids follow it: no character started before `k` can still change.
        """
        if len(self._window) - self._read_offset <= MAX_HELD_TOKENS:
            return ""
        cut = len(self._window) - _NUM_SETTLING_TOKENS
        left = self._decode(self._window[self._prefix_offset : cut])
        right = self._decode(self._window[cut:])
        if left + right != text or not left.startswith(self._prefix_text):
            return ""
        delta = left[len(self._prefix_text) :]
        del self._window[:cut]
        self._prefix_offset, self._read_offset, self._prefix_text = 0, 0, ""
        return delta
