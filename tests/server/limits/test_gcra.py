"""GCRA arithmetic, the in-process limiter on a fake clock, the Redis limiter on the real Redis,
and the header format, all checked against exact values."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import redis

from talkloop.server.limits.gcra import InProcessLimiter
from talkloop.server.limits.headers import format_reset, limit_headers
from talkloop.server.limits.limiter import LimitState, RateLimit
from talkloop.server.limits.redis_limiter import RedisLimiter

REDIS_URL = "redis://127.0.0.1:6379/0"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_full_bucket_admits_a_burst_of_exactly_the_limit() -> None:
    clock = FakeClock()
    limiter = InProcessLimiter(clock)
    decisions = [limiter.acquire([RateLimit("k", 3, 1)]) for _ in range(4)]
    assert [d.admitted for d in decisions] == [True, True, True, False]
    assert [d.states[0].remaining for d in decisions] == [2, 1, 0, 0]
    assert decisions[0].states[0].reset_s == pytest.approx(20.0)
    assert decisions[3].retry_after_s == pytest.approx(20.0)


def test_the_bucket_refills_one_unit_per_emission_interval() -> None:
    clock = FakeClock()
    limiter = InProcessLimiter(clock)
    for _ in range(3):
        assert limiter.acquire([RateLimit("k", 3, 1)]).admitted
    clock.now += 19.9
    assert not limiter.acquire([RateLimit("k", 3, 1)]).admitted
    clock.now += 0.1
    assert limiter.acquire([RateLimit("k", 3, 1)]).admitted
    assert not limiter.acquire([RateLimit("k", 3, 1)]).admitted


def test_a_refusal_on_one_limit_consumes_none_of_the_others() -> None:
    limiter = InProcessLimiter(FakeClock())
    assert limiter.acquire([RateLimit("rpm", 10, 1), RateLimit("tpm", 100, 90)]).admitted
    refused = limiter.acquire([RateLimit("rpm", 10, 1), RateLimit("tpm", 100, 20)])
    assert not refused.admitted
    assert [s.remaining for s in refused.states] == [9, 10]
    assert refused.states[1].retry_after_s == pytest.approx(6.0)  # 10 tokens x 0.6 s
    assert limiter.acquire([RateLimit("rpm", 10, 1), RateLimit("tpm", 100, 10)]).admitted


@pytest.fixture
def redis_limiter() -> Iterator[RedisLimiter]:
    prefix = f"talkloop-test:{secrets.token_hex(6)}:"
    client = redis.Redis.from_url(REDIS_URL)
    limiter = RedisLimiter(client, prefix)
    yield limiter
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    limiter.close()


def test_redis_limiter_admits_exactly_the_limit_and_sets_expiring_keys(
    redis_limiter: RedisLimiter,
) -> None:
    decisions = [redis_limiter.acquire([RateLimit("{k}:rpm", 3, 1)]) for _ in range(4)]
    assert [d.admitted for d in decisions] == [True, True, True, False]
    assert [d.states[0].remaining for d in decisions] == [2, 1, 0, 0]
    assert 19.9 < decisions[0].states[0].reset_s <= 20.0
    assert 19.0 < decisions[3].retry_after_s <= 20.0
    ttl_ms = redis_limiter._client.pttl(redis_limiter._prefix + "{k}:rpm")
    assert 59_000 < ttl_ms <= 61_000


def test_redis_limiter_refusal_consumes_nothing(redis_limiter: RedisLimiter) -> None:
    assert redis_limiter.acquire([RateLimit("{k}:rpm", 10, 1), RateLimit("{k}:tpm", 100, 90)])
    refused = redis_limiter.acquire([RateLimit("{k}:rpm", 10, 1), RateLimit("{k}:tpm", 100, 20)])
    assert not refused.admitted
    assert [s.remaining for s in refused.states] == [9, 10]
    admitted = redis_limiter.acquire([RateLimit("{k}:rpm", 10, 1), RateLimit("{k}:tpm", 100, 10)])
    assert admitted.admitted
    assert [s.remaining for s in admitted.states] == [8, 0]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0ms"), (0.0204, "20ms"), (1.0, "1s"), (1.5, "1.5s"), (20.0, "20s"), (360.0, "6m0s")],
)
def test_reset_durations_are_written_as_openai_does(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_limit_headers_name_the_trio_of_a_kind() -> None:
    assert limit_headers("tokens", LimitState(1000, 990, 0.6, 0.0)) == {
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "990",
        "x-ratelimit-reset-tokens": "600ms",
    }
