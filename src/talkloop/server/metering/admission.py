"""Admission of one generation: the key's rate limits, then the quotas (reserve).

Runs in a worker thread (database and Redis calls are blocking). The token estimate that both
use is the prompt's tokens plus `max_tokens` per choice, as OpenAI counts tokens per minute;
the prompt is tokenized exactly when the backend can render it (the built-in engine).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from talkloop.backends.base import GenerationRequest, ModelBackend
from talkloop.server.db.database import Database
from talkloop.server.db.metering_tables import WHOLE_TENANT, KeyRateLimit
from talkloop.server.errors import RateLimitedError
from talkloop.server.ledger import UsageEntry
from talkloop.server.limits import Decision, RateLimit, RateLimiter
from talkloop.server.limits.headers import limit_headers, publish
from talkloop.server.metering.prices import find_rates
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
    ) -> None:
        self._db = db
        self._limiter = limiter
        self._quotas = quotas
        self._backends = backends
        self._default_limits = default_limits

    def admit(self, entry: UsageEntry, request: GenerationRequest) -> None:
        """Raise RateLimitedError or QuotaExceededError (429), or hold this request's quota."""
        key_id = entry.api_key_id
        with self._db.session() as session:
            limits = KeyLimits() if key_id is None else self._limits(session, entry, key_id)
            quotas = quotas_for(session, entry.tenant_id, key_id)
            rates = find_rates(session, entry.tenant_id, entry.model, entry.created_at)
        if limits.unlimited and not quotas:
            return
        estimate = estimate_tokens(self._backends.get(entry.model), request)
        if key_id is not None and not limits.unlimited:
            self._check_rate(key_id, limits, estimate)
        if quotas:
            micros = rates.cost_micros(estimate.prompt_tokens, 0, estimate.completion_tokens)
            self._quotas.reserve(quotas, entry.request_id, Charge(estimate.total_tokens, micros))

    def _limits(self, session: Session, entry: UsageEntry, key_id: str) -> KeyLimits:
        return key_limits(session, entry.tenant_id, key_id, self._default_limits)

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
