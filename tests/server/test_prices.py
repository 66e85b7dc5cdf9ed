"""Cost arithmetic in integer micro-units: exact sums, one half-up rounding per row."""

from __future__ import annotations

from decimal import Decimal

import pytest

from talkloop.server.metering.prices import Rates, default_cached_price, to_micros


def test_cost_charges_uncached_cached_and_completion_tokens_at_their_rates() -> None:
    rates = Rates(prompt=150_000, cached_prompt=75_000, completion=600_000)  # $0.15/$0.075/$0.60
    # 800 uncached x 0.15 + 200 cached x 0.075 + 500 x 0.60 per Mtok = 435 micro-dollars
    assert rates.cost_micros(1000, 200, 500) == 435


def test_cost_rounds_half_up_once_per_row() -> None:
    rates = Rates(prompt=1, cached_prompt=0, completion=0)
    assert rates.cost_micros(500_000, 0, 0) == 1
    assert rates.cost_micros(499_999, 0, 0) == 0


def test_cached_tokens_never_exceed_prompt_tokens() -> None:
    assert Rates(10**6, 0, 0).cost_micros(5, 9, 0) == 0


def test_prices_convert_to_exact_micros_and_refuse_finer_amounts() -> None:
    assert to_micros(Decimal("0.150000")) == 150_000
    assert to_micros(Decimal("12.5")) == 12_500_000
    with pytest.raises(ValueError, match="six decimal places"):
        to_micros(Decimal("0.0000001"))
    assert default_cached_price(Decimal("0.15")) == Decimal("0.075000")
