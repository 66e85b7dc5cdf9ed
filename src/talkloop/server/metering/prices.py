"""Prices per million tokens and the cost of one ledger row, in integer micro-units.

Prices are stored as decimals with six places (`Numeric(18, 6)`), so a price is an exact
integer of micro-units (1e-6 of its currency) per million tokens. Cost never touches a float:
    cost_micros = round_half_up((uncached * P + cached * C + completion * K) / 1e6)
with P, C, K the prompt, cached-prompt and completion rates and `uncached = prompt - cached`
(OpenAI counts cached tokens inside prompt tokens). One rounding per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from talkloop.server.db.models import Price

MICROS_PER_UNIT = 1_000_000
TOKENS_PER_RATE = 1_000_000  # rates are per million tokens
DEFAULT_CACHED_DISCOUNT = Decimal("0.5")  # cached prompt tokens cost half, unless priced


def to_micros(amount: Decimal) -> int:
    """An amount of currency as exact micro-units; ValueError past six decimal places."""
    scaled = amount * MICROS_PER_UNIT
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{amount} has more than six decimal places")
    return int(scaled)


@dataclass(frozen=True)
class Rates:
    """Micro-units of currency per million tokens."""

    prompt: int
    cached_prompt: int
    completion: int

    @classmethod
    def from_price(cls, price: Price) -> Rates:
        return cls(
            to_micros(price.prompt_per_mtok),
            to_micros(price.cached_prompt_per_mtok),
            to_micros(price.completion_per_mtok),
        )

    def cost_micros(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        cached = min(cached_tokens, prompt_tokens)
        scaled = (
            (prompt_tokens - cached) * self.prompt
            + cached * self.cached_prompt
            + completion_tokens * self.completion
        )
        return (scaled + TOKENS_PER_RATE // 2) // TOKENS_PER_RATE


FREE = Rates(0, 0, 0)


def default_cached_price(prompt_per_mtok: Decimal) -> Decimal:
    return (prompt_per_mtok * (1 - DEFAULT_CACHED_DISCOUNT)).quantize(Decimal("0.000001"))


def find_price(session: Session, tenant_id: str, model: str, at: datetime) -> Price | None:
    """The price in effect at `at`: the tenant's own if it has one, else the default."""
    query = (
        select(Price)
        .where(Price.model == model, Price.effective_from <= at)
        .where(or_(Price.tenant_id == tenant_id, Price.tenant_id.is_(None)))
        .order_by(Price.tenant_id.is_(None), Price.effective_from.desc())
        .limit(1)
    )
    return session.scalars(query).first()


def find_rates(session: Session, tenant_id: str, model: str, at: datetime) -> Rates:
    """The rates in effect, or `FREE` when the model has no price."""
    price = find_price(session, tenant_id, model, at)
    return Rates.from_price(price) if price is not None else FREE


class RateCache:
    """Rates looked up once per (tenant, model) for one batch of ledger rows."""

    def __init__(self, session: Session, at: datetime) -> None:
        self._session = session
        self._at = at
        self._rates: dict[tuple[str, str], Rates] = {}

    def rates(self, tenant_id: str, model: str) -> Rates:
        key = (tenant_id, model)
        if key not in self._rates:
            self._rates[key] = find_rates(self._session, tenant_id, model, self._at)
        return self._rates[key]


def list_prices(session: Session, tenant_id: str | None = None) -> Sequence[Price]:
    """Every price row (or the defaults and one tenant's own), newest first per model."""
    query = select(Price).order_by(Price.model, Price.effective_from.desc())
    if tenant_id is not None:
        query = query.where(or_(Price.tenant_id == tenant_id, Price.tenant_id.is_(None)))
    return session.scalars(query).all()
