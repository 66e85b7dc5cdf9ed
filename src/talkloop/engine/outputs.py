"""Plain data the engine hands to its callers: per-step deltas of each request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass(frozen=True)
class CompletionDelta:
    """What one sequence (choice `index`) produced in one step."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    stop_reason: str | int | None = None  # the stop string or stop token id that matched


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    deltas: tuple[CompletionDelta, ...]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    error: str | None = None  # set when the request failed inside the engine
    queue_time_s: float | None = None  # arrival to first scheduled, once it was scheduled
