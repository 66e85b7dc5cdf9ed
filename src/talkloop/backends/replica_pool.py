"""`ReplicaPool`: which replica of a remote model server serves a request, and their health.

A request with a session id goes to its owner on a consistent-hash ring (so a conversation
returns to the replica holding its KV cache); one without goes to the replica with the fewest
requests in flight (ties in turn). A replica that fails to connect is marked down for a
cool-down and skipped; its sessions fall to the next replica on the ring until it is tried
again. It does no I/O: `RemoteBackend` reports outcomes with `mark_down` / `mark_up`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from talkloop.backends.hash_ring import DEFAULT_NUM_VNODES, HashRing


@dataclass
class Replica:
    """Live, mutable state of one replica (owned by the pool; callers read snapshots)."""

    url: str  # base URL of its OpenAI API, e.g. http://10.0.0.5:8000/v1
    in_flight: int = 0
    num_requests: int = 0
    num_failures: int = 0
    down_until: float = 0.0  # clock time before which it is skipped

    def is_up(self, now: float) -> bool:
        return now >= self.down_until


@dataclass(frozen=True)
class ReplicaState:
    url: str
    up: bool
    in_flight: int
    num_requests: int
    num_failures: int


class NoReplicaError(Exception):
    """Every replica was tried or is down; `retry_after_s` is when the first is tried again."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ReplicaPool:
    def __init__(
        self,
        urls: Sequence[str],
        cooldown_s: float = 5.0,
        num_vnodes: int = DEFAULT_NUM_VNODES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError("a replica pool needs at least one replica URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"replica URLs must be distinct, got {list(urls)}")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self.replicas = {url: Replica(url) for url in urls}
        self.ring = HashRing(urls, num_vnodes)
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._turn = itertools.count()

    def pick(self, session_id: str | None, tried: Collection[str] = ()) -> Replica:
        """The replica for the next attempt of a request; raises NoReplicaError if none is left."""
        now = self._clock()
        if session_id is not None:
            order = [self.replicas[url] for url in self.ring.candidates(session_id)]
        else:
            order = self._least_outstanding_first()
        for replica in order:
            if replica.url not in tried and replica.is_up(now):
                return replica
        raise self._no_replica(now, len(tried))

    def _least_outstanding_first(self) -> list[Replica]:
        replicas = list(self.replicas.values())
        start = next(self._turn) % len(replicas)
        rotated = replicas[start:] + replicas[:start]  # ties go to each replica in turn
        return sorted(rotated, key=lambda r: r.in_flight)

    def _no_replica(self, now: float, num_tried: int) -> NoReplicaError:
        waits_s = [r.down_until - now for r in self.replicas.values() if not r.is_up(now)]
        return NoReplicaError(
            f"no replica of the remote backend could take the request "
            f"({len(waits_s)} of {len(self.replicas)} down, {num_tried} tried)",
            retry_after_s=max(min(waits_s, default=1.0), 1.0),
        )

    def begin(self, replica: Replica) -> None:
        replica.in_flight += 1
        replica.num_requests += 1

    def end(self, replica: Replica) -> None:
        replica.in_flight -= 1

    def mark_down(self, replica: Replica) -> None:
        replica.num_failures += 1
        replica.down_until = self._clock() + self.cooldown_s

    def mark_up(self, replica: Replica) -> None:
        replica.down_until = 0.0

    def states(self) -> list[ReplicaState]:
        now = self._clock()
        return [
            ReplicaState(r.url, r.is_up(now), r.in_flight, r.num_requests, r.num_failures)
            for r in self.replicas.values()
        ]
