"""Rate limits and quotas on the live server (SQLite and PostgreSQL): exact admitted counts
under concurrency, OpenAI's 429 bodies and headers, and the quota overspend bound."""

from __future__ import annotations

import pytest

from talkloop.server.limits.headers import format_reset
from tests.server.conftest import LiveServer
from tests.server.metering_helpers import admin_put, burst, chat

pytestmark = pytest.mark.integration


def _key_id(server: LiveServer, tenant_id: str) -> str:
    with server.http(server.admin_key) as client:
        [key] = client.get(f"/admin/tenants/{tenant_id}/keys").json()
    key_id: str = key["id"]
    return key_id


def test_rpm_admits_exactly_the_limit_under_concurrency(server: LiveServer) -> None:
    tenant_id, key = server.new_tenant()
    admin_put(server, "/api/admin/rate-limits", {"tenant_id": tenant_id, "requests_per_minute": 4})
    responses = burst(server, key, 10)
    assert sorted(r.status_code for r in responses) == [200] * 4 + [429] * 6
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "requests"
    assert refused.headers["x-should-retry"] == "true"
    assert 1 <= int(refused.headers["Retry-After"]) <= 15  # one slot per 15 s
    assert refused.headers["x-ratelimit-limit-requests"] == "4"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    statuses = [row["status"] for row in server.ledger_rows(tenant_id=tenant_id)]
    assert sorted(statuses) == ["ok"] * 4 + ["rejected"] * 6


def test_first_response_carries_both_header_trios_with_exact_values(server: LiveServer) -> None:
    tenant_id, key = server.new_tenant()
    limits = {"tenant_id": tenant_id, "requests_per_minute": 3, "tokens_per_minute": 1000}
    admin_put(server, "/api/admin/rate-limits", limits)
    response = chat(server, key, max_tokens=4)
    assert response.status_code == 200
    cost = response.json()["usage"]["prompt_tokens"] + 4  # prompt + max_tokens
    headers = response.headers
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "2"
    assert headers["x-ratelimit-reset-requests"] == "20s"
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert headers["x-ratelimit-remaining-tokens"] == str(1000 - cost)
    assert headers["x-ratelimit-reset-tokens"] == format_reset(cost * 0.06)  # 60 ms per token


def test_tpm_counts_prompt_plus_max_tokens(server: LiveServer) -> None:
    tenant_id, key = server.new_tenant()
    probe = chat(server, key, max_tokens=10).json()["usage"]["prompt_tokens"]
    cost = probe + 10
    limits = {"tenant_id": tenant_id, "tokens_per_minute": 2 * cost + cost // 2}
    admin_put(server, "/api/admin/rate-limits", limits)
    statuses = [chat(server, key, max_tokens=10).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_a_request_larger_than_the_tpm_limit_is_refused(server: LiveServer) -> None:
    tenant_id, key = server.new_tenant()
    admin_put(server, "/api/admin/rate-limits", {"tenant_id": tenant_id, "tokens_per_minute": 5})
    response = chat(server, key, max_tokens=8)
    assert response.status_code == 429
    assert "request too large" in response.json()["error"]["message"]


def test_a_key_row_overrides_the_tenant_row(server: LiveServer) -> None:
    tenant_id, key = server.new_tenant()
    admin_put(server, "/api/admin/rate-limits", {"tenant_id": tenant_id, "requests_per_minute": 1})
    key_limit = {"tenant_id": tenant_id, "api_key_id": _key_id(server, tenant_id),
                 "requests_per_minute": 2}  # fmt: skip
    admin_put(server, "/api/admin/rate-limits", key_limit)
    assert [chat(server, key).status_code for _ in range(3)] == [200, 200, 429]


def _quota_status(server: LiveServer, key: str) -> dict[str, int]:
    assert server.services.ledger.flush(10)
    with server.http(key) as client:
        [status] = client.get("/api/usage/quotas").json()
    return dict(status)


def test_quota_hard_stop_is_insufficient_quota_without_retry(server: LiveServer) -> None:
    tenant_id, key = server.new_tenant()
    admin_put(server, "/api/admin/quotas", {"tenant_id": tenant_id, "max_tokens": 1})
    first = chat(server, key)
    assert first.status_code == 200
    assert server.services.ledger.flush(10)
    refused = chat(server, key)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "insufficient_quota", "insufficient_quota", None,
    )  # fmt: skip
    assert "quota" in error["message"]
    assert refused.headers["x-should-retry"] == "false"
    assert "retry-after" not in refused.headers
    used = first.json()["usage"]["total_tokens"]
    status = _quota_status(server, key)
    assert (status["used_tokens"], status["reserved_tokens"]) == (used, 0)


def test_concurrent_requests_overspend_a_quota_by_less_than_one_reservation(
    server: LiveServer,
) -> None:
    tenant_id, key = server.new_tenant()
    prompt_tokens = chat(server, key).json()["usage"]["prompt_tokens"]
    reservation = prompt_tokens + 4  # prompt + max_tokens
    quota = 3 * reservation + 1  # room for exactly 4 reservations
    admin_put(server, "/api/admin/quotas", {"tenant_id": tenant_id, "max_tokens": quota})
    assert server.services.ledger.flush(10)
    responses = burst(server, key, 10, max_tokens=4)
    admitted = [r for r in responses if r.status_code == 200]
    assert len(admitted) >= 4
    assert {r.json()["error"]["code"] for r in responses if r.status_code != 200} == {
        "insufficient_quota"
    }
    status = _quota_status(server, key)
    used = sum(r.json()["usage"]["total_tokens"] for r in admitted)
    assert (status["used_tokens"], status["reserved_tokens"]) == (used, 0)
    assert used < quota + reservation  # the documented bound


def test_cost_budget_stops_when_spent(server: LiveServer) -> None:
    tenant_id, key = server.new_tenant()
    price = {
        "tenant_id": tenant_id,
        "model": "smollm2",
        "prompt_per_mtok": "1000",
        "completion_per_mtok": "1000",
    }  # fmt: skip  1 000 micros per token
    with server.http(server.admin_key) as client:
        assert client.post("/api/admin/prices", json=price).status_code == 201
    admin_put(server, "/api/admin/quotas", {"tenant_id": tenant_id, "max_cost_micros": 1})
    assert chat(server, key).status_code == 200
    assert server.services.ledger.flush(10)
    refused = chat(server, key)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"
    status = _quota_status(server, key)
    assert status["used_cost_micros"] >= 1000
