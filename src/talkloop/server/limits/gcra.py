"""GCRA (generic cell rate algorithm) and the in-process limiter built on it.

GCRA keeps one number per bucket, the theoretical arrival time `tat`. With `limit` units per
window W, each unit is worth an emission interval T = W / limit. A request of `cost` units is
admitted iff `tat' - now <= W`, where `tat' = max(tat, now) + cost * T`; then `tat = tat'`.
So a full bucket admits a burst of `limit` units and refills at one unit per T, with no
window boundaries. The Redis Lua script implements exactly this arithmetic.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence

from talkloop.server.limits.limiter import WINDOW_S, Decision, LimitState, RateLimit

Clock = Callable[[], float]
EPSILON_S = 1e-9  # float slack so exactly `limit` units fit


def gcra_check(tat: float, now: float, limit: int, cost: int) -> tuple[float, LimitState]:
    """(new tat if admitted, state); `state.retry_after_s > 0` means refused."""
    interval = WINDOW_S / limit
    new_tat = max(tat, now) + cost * interval
    excess = new_tat - now - WINDOW_S
    if excess > EPSILON_S:
        backlog = max(tat, now) - now
        remaining = max(0, math.floor((WINDOW_S - backlog) / interval + EPSILON_S))
        return tat, LimitState(limit, remaining, backlog, excess)
    remaining = max(0, math.floor((WINDOW_S - (new_tat - now)) / interval + EPSILON_S))
    return new_tat, LimitState(limit, remaining, new_tat - now, 0.0)


def _unchanged(tat: float, now: float, limit: RateLimit, state: LimitState) -> LimitState:
    """A bucket's state when its cost was not taken (its own refusal already says so)."""
    if state.retry_after_s > 0:
        return state
    return gcra_check(tat, now, limit.limit, 0)[1]


class InProcessLimiter:
    """GCRA buckets in a dict: exact for one process, not shared between replicas."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._tats: dict[str, float] = {}
        self._lock = threading.Lock()

    def acquire(self, limits: Sequence[RateLimit]) -> Decision:
        with self._lock:
            now = self._clock()
            checked = [
                gcra_check(self._tats.get(lim.bucket, now), now, lim.limit, lim.cost)
                for lim in limits
            ]
            admitted = all(state.retry_after_s == 0.0 for _, state in checked)
            if not admitted:  # nothing is consumed: report the buckets as they stand
                states = [_unchanged(self._tats.get(lim.bucket, now), now, lim, st)
                          for lim, (_, st) in zip(limits, checked, strict=True)]  # fmt: skip
                return Decision(False, tuple(states))
            for lim, (tat, _) in zip(limits, checked, strict=True):
                self._tats[lim.bucket] = tat
            self._forget_full(now)
            return Decision(True, tuple(state for _, state in checked))

    def _forget_full(self, now: float) -> None:
        """Drop buckets that refilled completely (bounded memory for many keys)."""
        if len(self._tats) > 10_000:
            self._tats = {bucket: tat for bucket, tat in self._tats.items() if tat > now}

    def close(self) -> None:
        self._tats.clear()
