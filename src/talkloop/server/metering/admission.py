"""Admission of one generation: the key's rate limits, then the quotas (reserve).

Runs in a worker thread (database and Redis calls are blocking). The token estimate that both
use is the prompt's tokens plus `max_tokens` per choice, as OpenAI counts tokens per minute;
the prompt is tokenized exactly when the backend can render it (the built-in engine).

What applies to a (tenant, key, model) - its limits, quotas and prices, a `Policy` - is read
from the database at most once per `ttl_s` and at once after `policies.changed()`; a request
with no limits and no quotas is then admitted without leaving the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from talkloop.backends.base import GenerationRequest, ModelBackend
from talkloop.server.db.database import Database
from talkloop.server.db.metering_tables import WHOLE_TENANT, KeyRateLimit, Quota
from talkloop.server.errors import RateLimitedError
from talkloop.server.ledger import UsageEntry
from talkloop.server.limits import Decision, RateLimit, RateLimiter
from talkloop.server.limits.headers import limit_headers, publish
from talkloop.server.metering import policies
from talkloop.server.metering.prices import Rates, find_rates
from talkloop.server.metering.quotas import Charge, QuotaBook, quotas_for

logger = logging.getLogger(__name__)

TEMPLATE_TOKENS_PER_MESSAGE = 8  # role markers a chat template adds (other backends)


@dataclass(frozen=True)
class KeyLimits:
    """Requests and tokens per minute for one key; None is unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        for value in (self.requests_per_minute, self.tokens_per_minute):
            if value is not None and value < 1:
                raise ValueError(f"rate limits must be >= 1 per minute, got {value}")

    @property
    def unlimited(self) -> bool:
        return self.requests_per_minute is None and self.tokens_per_minute is None


@dataclass(frozen=True)
class TokenEstimate:
    prompt_tokens: int
    completion_tokens: int  # max_tokens x n

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Policy:
    """What admission applies to one (tenant, key, model)."""

    limits: KeyLimits
    quotas: Sequence[Quota]
    rates: Rates

    @property
    def free(self) -> bool:
        """Nothing to check or hold: no rate limit and no quota."""
        return self.limits.unlimited and not self.quotas


PolicyKey = tuple[str, str | None, str]  # (tenant, key, model)


class PolicyCache:
    """Policies kept for `ttl_s` seconds, and dropped when `policies.generation()` moves."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[PolicyKey, tuple[float, int, Policy]] = {}

    def get(self, key: PolicyKey) -> Policy | None:
        with self._lock:
            found = self._entries.get(key)
        if found is None:
            return None
        loaded_at, generation, policy = found
        if generation != policies.generation() or self._clock() - loaded_at >= self._ttl_s:
            return None
        return policy

    def put(self, key: PolicyKey, policy: Policy, generation: int) -> None:
        """Keep `policy`, read after `generation` was current (so a change since is seen)."""
        if self._ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) >= MAX_CACHED_POLICIES:
                self._entries.clear()
            self._entries[key] = (self._clock(), generation, policy)


MAX_CACHED_POLICIES = 100_000


def key_limits(session: Session, tenant_id: str, key_id: str, default: KeyLimits) -> KeyLimits:
    """The key's own row, else its tenant's row, else the server default."""
    query = select(KeyRateLimit).where(
        KeyRateLimit.tenant_id == tenant_id, KeyRateLimit.api_key_id.in_([WHOLE_TENANT, key_id])
    )
    rows = {row.api_key_id: row for row in session.scalars(query)}
    row = rows.get(key_id) or rows.get(WHOLE_TENANT)
    if row is None:
        return default
    return KeyLimits(row.requests_per_minute, row.tokens_per_minute)


def prompt_tokens(backend: ModelBackend | None, request: GenerationRequest) -> int:
    render = getattr(backend, "prompt_token_ids", None)
    if render is not None:
        return len(render(request))
    if request.prompt is not None and not isinstance(request.prompt, str):
        return len(request.prompt)
    texts = [request.prompt] if isinstance(request.prompt, str) else []
    texts += [str(message.get("content") or "") for message in request.messages or ()]
    overhead = TEMPLATE_TOKENS_PER_MESSAGE * len(request.messages or ())
    if backend is None:
        return sum(len(text.encode()) for text in texts) + overhead
    return sum(backend.count_tokens(text) for text in texts) + overhead


def estimate_tokens(backend: ModelBackend | None, request: GenerationRequest) -> TokenEstimate:
    params = request.params
    return TokenEstimate(prompt_tokens(backend, request), params.max_tokens * params.n)


class Admission:
    def __init__(
        self,
        db: Database,
        limiter: RateLimiter,
        quotas: QuotaBook,
        backends: Mapping[str, ModelBackend],
        default_limits: KeyLimits,
        policy_ttl_s: float = 1.0,
    ) -> None:
        self._db = db
        self._limiter = limiter
        self._quotas = quotas
        self._backends = backends
        self._default_limits = default_limits
        self._policies = PolicyCache(policy_ttl_s)

    def cached_policy(self, entry: UsageEntry) -> Policy | None:
        """The entry's policy if it is cached and fresh (no database work)."""
        return self._policies.get(_policy_key(entry))

    def policy(self, entry: UsageEntry) -> Policy:
        """The entry's policy: cached, else read from the database (blocking)."""
        key = _policy_key(entry)
        found = self._policies.get(key)
        if found is not None:
            return found
        generation = policies.generation()
        key_id = entry.api_key_id
        with self._db.session() as session:
            limits = (
                KeyLimits()
                if key_id is None
                else key_limits(session, entry.tenant_id, key_id, self._default_limits)
            )
            quotas = quotas_for(session, entry.tenant_id, key_id)
            rates = find_rates(session, entry.tenant_id, entry.model, entry.created_at)
        policy = Policy(limits, quotas, rates)
        self._policies.put(key, policy, generation)
        return policy

    def admit(self, entry: UsageEntry, request: GenerationRequest) -> None:
        """Raise RateLimitedError or QuotaExceededError (429), or hold this request's quota."""
        policy = self.policy(entry)
        if policy.free:
            return
        key_id = entry.api_key_id
        estimate = estimate_tokens(self._backends.get(entry.model), request)
        if key_id is not None and not policy.limits.unlimited:
            self._check_rate(key_id, policy.limits, estimate)
        if policy.quotas:
            micros = policy.rates.cost_micros(estimate.prompt_tokens, 0, estimate.completion_tokens)
            charge = Charge(estimate.total_tokens, micros)
            self._quotas.reserve(policy.quotas, entry.request_id, charge)

    def _check_rate(self, key_id: str, limits: KeyLimits, estimate: TokenEstimate) -> None:
        wanted: list[tuple[str, RateLimit]] = []
        if limits.requests_per_minute is not None:
            wanted.append(
                ("requests", RateLimit(f"{{{key_id}}}:rpm", limits.requests_per_minute, 1))
            )
        if limits.tokens_per_minute is not None:
            tpm = limits.tokens_per_minute
            if estimate.total_tokens > tpm:
                raise RateLimitedError(
                    f"request too large for key {key_id} on tokens per minute: limit {tpm}, "
                    f"requested {estimate.total_tokens} (prompt + max_tokens); lower max_tokens",
                    retry_after_s=60.0,
                )
            wanted.append(("tokens", RateLimit(f"{{{key_id}}}:tpm", tpm, estimate.total_tokens)))
        decision = self._acquire([limit for _, limit in wanted])
        kinds = [kind for kind, _ in wanted]
        for kind, state in zip(kinds, decision.states, strict=False):
            publish(limit_headers(kind, state))
        if not decision.admitted:
            refused = [k for k, s in zip(kinds, decision.states, strict=True) if s.retry_after_s]
            raise RateLimitedError(
                f"rate limit reached for key {key_id} on {' and '.join(refused)} per minute; "
                f"retry in {decision.retry_after_s:.1f}s",
                retry_after_s=decision.retry_after_s,
            )

    def _acquire(self, limits: list[RateLimit]) -> Decision:
        try:
            return self._limiter.acquire(limits)
        except Exception:  # NOTE: fail open: a limiter outage must not take the API down
            logger.warning("rate limiter unavailable; admitting without limits", exc_info=True)
            return Decision(True, ())


def _policy_key(entry: UsageEntry) -> PolicyKey:
    return (entry.tenant_id, entry.api_key_id, entry.model)
