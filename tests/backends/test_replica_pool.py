"""ReplicaPool: session affinity, least-outstanding spreading, down replicas and cool-down."""

from __future__ import annotations

import pytest

from talkloop.backends.hash_ring import HashRing
from talkloop.backends.replica_pool import NoReplicaError, ReplicaPool

URLS = ["http://a:8000/v1", "http://b:8000/v1", "http://c:8000/v1"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _pool(clock: FakeClock) -> ReplicaPool:
    return ReplicaPool(URLS, cooldown_s=5.0, clock=clock)


def test_a_session_goes_to_its_ring_owner_every_time() -> None:
    pool = _pool(FakeClock())
    ring = HashRing(URLS)
    for i in range(50):
        session = f"conv-{i}"
        picks = {pool.pick(session).url for _ in range(3)}
        assert picks == {ring.node_for(session)}


def test_requests_without_a_session_go_to_the_least_busy_replica_ties_in_turn() -> None:
    pool = _pool(FakeClock())
    picked = []
    for _ in range(3):
        replica = pool.pick(None)
        pool.begin(replica)
        picked.append(replica.url)
    assert sorted(picked) == URLS  # one each
    pool.end(pool.replicas[URLS[1]])
    assert pool.pick(None).url == URLS[1]  # now the only one with fewer in flight


def test_a_down_replica_is_skipped_until_its_cooldown_ends() -> None:
    clock = FakeClock()
    pool = _pool(clock)
    session = next(f"s{i}" for i in range(100) if pool.pick(f"s{i}").url == URLS[0])
    order = list(pool.ring.candidates(session))
    pool.mark_down(pool.replicas[URLS[0]])
    assert pool.pick(session).url == order[1]  # the next replica on the ring
    assert URLS[0] not in {pool.pick(None).url for _ in range(6)}
    clock.now += 4.9
    assert pool.pick(session).url == order[1]
    clock.now += 0.1
    assert pool.pick(session).url == URLS[0]  # tried again after the cool-down
    states = {s.url: s for s in pool.states()}
    assert states[URLS[0]].num_failures == 1 and states[URLS[0]].up


def test_tried_replicas_are_not_picked_again_and_none_left_says_when_to_retry() -> None:
    clock = FakeClock()
    pool = _pool(clock)
    first = pool.pick("conv")
    second = pool.pick("conv", [first.url])
    assert second.url != first.url
    (third,) = set(URLS) - {first.url, second.url}
    pool.mark_down(pool.replicas[third])
    clock.now += 2.0
    with pytest.raises(NoReplicaError, match=r"\(1 of 3 down, 2 tried\)") as caught:
        pool.pick("conv", [first.url, second.url])
    assert caught.value.retry_after_s == 3.0


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one replica"):
        ReplicaPool([])
    with pytest.raises(ValueError, match="must be distinct"):
        ReplicaPool([URLS[0], URLS[0]])
    with pytest.raises(ValueError, match="cooldown_s must be >= 0"):
        ReplicaPool(URLS, cooldown_s=-1)
