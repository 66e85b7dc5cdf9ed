"""Detokenize sampled tokens, apply stop conditions, and build `RequestOutput` deltas.

Stop strings are matched across token boundaries on the decoded text; text that could be the
start of a stop string is held back until it is known not to be one, so stop text never leaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from talkloop.engine.outputs import CompletionDelta, TokenLogprob
from talkloop.engine.sequence import FinishReason, Sequence


class Detokenizer(Protocol):
    def step(self, token_id: int) -> str: ...


@dataclass
class TextState:
    """Per-sequence text bookkeeping."""

    detokenizer: Detokenizer
    text: str = ""  # all text decoded so far (stop string cut off once found)
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    stop_reason: str | int | None = None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def append_text(state: TextState, seq: Sequence, token_id: int) -> bool:
    """Add one token's text; return True when a stop string was found."""
    delta = state.detokenizer.step(token_id)
    if not delta:
        return False
    stops = seq.params.stop
    search_from = max(0, len(state.text) - max((len(s) for s in stops), default=0) + 1)
    state.text += delta
    found = [(i, s) for s in stops if (i := state.text.find(s, search_from)) >= 0]
    if not found:
        return False
    index, stop = min(found)
    keep = index + len(stop) if seq.params.include_stop_str_in_output else index
    state.text = state.text[:keep]
    state.stop_reason = stop
    return True


def check_stop(
    seq: Sequence, token_id: int, stop_token_ids: frozenset[int], max_len: int
) -> FinishReason | None:
    """Stop token, max_tokens or context length reached? (Stop strings are checked on text.)"""
    if token_id in seq.params.stop_token_ids or (
        not seq.params.ignore_eos and token_id in stop_token_ids
    ):
        return FinishReason.STOP
    if len(seq.output_token_ids) >= seq.params.max_tokens or seq.num_tokens >= max_len:
        return FinishReason.LENGTH
    return None


def take_delta(state: TextState, seq: Sequence) -> CompletionDelta:
    """Everything new since the last delta that is safe to emit."""
    end = len(state.text)
    if not seq.is_finished:
        end -= _held_back(state.text, seq.params.stop)
    text = state.text[state.num_emitted_chars : end]
    state.num_emitted_chars = max(state.num_emitted_chars, end)
    token_ids = tuple(seq.output_token_ids[state.num_emitted_tokens :])
    state.num_emitted_tokens = len(seq.output_token_ids)
    logprobs = tuple(state.pending_logprobs) if seq.params.logprobs is not None else None
    state.pending_logprobs.clear()
    reason = seq.finish_reason.value if seq.finish_reason else None
    return CompletionDelta(seq.index, text, token_ids, logprobs, reason, state.stop_reason)
