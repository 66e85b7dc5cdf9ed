"""Admission's policy cache: fresh for its TTL, dropped at once by `policies.changed()`, and a
request with nothing to check admitted without a worker-thread hop."""

from __future__ import annotations

import asyncio

import pytest

from talkloop.server.metering import hooks, policies
from talkloop.server.metering.admission import KeyLimits, Policy, PolicyCache
from talkloop.server.metering.prices import FREE

KEY = ("tenant", "key", "model")
FREE_POLICY = Policy(KeyLimits(), (), FREE)
LIMITED = Policy(KeyLimits(requests_per_minute=5), (), FREE)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_policy_is_fresh_for_its_ttl_only() -> None:
    clock = Clock()
    cache = PolicyCache(ttl_s=1.0, clock=clock)
    assert cache.get(KEY) is None
    cache.put(KEY, LIMITED, policies.generation())
    clock.now += 0.9
    assert cache.get(KEY) is LIMITED
    clock.now += 0.1
    assert cache.get(KEY) is None


def test_a_committed_change_drops_cached_policies_at_once() -> None:
    cache = PolicyCache(ttl_s=60.0)
    cache.put(KEY, FREE_POLICY, policies.generation())
    assert cache.get(KEY) is FREE_POLICY
    policies.changed()
    assert cache.get(KEY) is None
    # A policy read before the change (older generation) is not taken as fresh either.
    stale_generation = policies.generation()
    policies.changed()
    cache.put(KEY, FREE_POLICY, stale_generation)
    assert cache.get(KEY) is None


def test_ttl_zero_caches_nothing() -> None:
    cache = PolicyCache(ttl_s=0.0)
    cache.put(KEY, FREE_POLICY, policies.generation())
    assert cache.get(KEY) is None


class FakeAdmission:
    def __init__(self, cached: Policy | None) -> None:
        self.cached = cached
        self.admitted = 0

    def cached_policy(self, entry: object) -> Policy | None:
        return self.cached

    def admit(self, entry: object, request: object) -> None:
        self.admitted += 1


@pytest.mark.parametrize(
    ("cached", "hops"), [(FREE_POLICY, 0), (LIMITED, 1), (None, 1)], ids=["free", "limited", "miss"]
)
def test_only_a_cached_free_policy_skips_the_worker_thread(
    cached: Policy | None, hops: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    admission = FakeAdmission(cached)
    threads = []

    async def to_thread(fn, *args):  # type: ignore[no-untyped-def]
        threads.append(fn)
        return fn(*args)

    monkeypatch.setattr(hooks.asyncio, "to_thread", to_thread)
    metering = hooks.Metering(admission, limiter=None, metrics=None)  # type: ignore[arg-type]
    asyncio.run(metering.admit(object(), object()))  # type: ignore[arg-type]
    assert len(threads) == hops and admission.admitted == hops
