"""The `RateLimiter` interface, its plain data, and the choice of implementation.

A limiter checks several limits at once and consumes from all of them only when every one
admits (so a request refused for tokens does not use up a request slot). It knows nothing
about HTTP or keys: callers name buckets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

WINDOW_S = 60.0  # limits are per minute


@dataclass(frozen=True)
class RateLimit:
    """At most `limit` units per minute in bucket `bucket` (a burst of `limit` is allowed)."""

    bucket: str
    limit: int
    cost: int  # units this request takes (1 for requests, its token estimate for tokens)

    def __post_init__(self) -> None:
        if self.limit < 1 or self.cost < 0:
            raise ValueError(f"rate limit {self.bucket!r}: limit >= 1 and cost >= 0 required")


@dataclass(frozen=True)
class LimitState:
    """One limit after the check: what is left and when it is full again."""

    limit: int
    remaining: int
    reset_s: float  # until the bucket is back to `limit`
    retry_after_s: float  # until this request's cost would fit (0 when admitted)


@dataclass(frozen=True)
class Decision:
    admitted: bool
    states: tuple[LimitState, ...]  # in the order the limits were given

    @property
    def retry_after_s(self) -> float:
        return max((state.retry_after_s for state in self.states), default=0.0)


class RateLimiter(Protocol):
    def acquire(self, limits: Sequence[RateLimit]) -> Decision:
        """Admit (consuming every cost) or refuse (consuming nothing), atomically."""
        ...

    def close(self) -> None: ...


def build_limiter(redis_url: str | None, prefix: str) -> RateLimiter:
    """Redis-backed when `redis_url` is set (shared by replicas), else in this process."""
    if redis_url:
        from talkloop.server.limits.redis_limiter import RedisLimiter

        return RedisLimiter.from_url(redis_url, prefix)
    from talkloop.server.limits.gcra import InProcessLimiter

    return InProcessLimiter()
