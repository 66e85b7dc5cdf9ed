"""Usage ledger cost, summaries, quota status and CSV export on the live server (SQLite and
PostgreSQL): exact sums against the ledger rows, tenant isolation, admin access."""

from __future__ import annotations

import csv
import io

import pytest

from talkloop.server.metering.summaries import CSV_COLUMNS
from tests.server.conftest import MODEL, LiveServer
from tests.server.metering_helpers import admin_post, chat

pytestmark = pytest.mark.integration


def _second_key(server: LiveServer, tenant_id: str) -> str:
    with server.http(server.admin_key) as client:
        created = client.post(f"/admin/tenants/{tenant_id}/keys", json={"name": "second"})
    key: str = created.json()["key"]
    return key


def test_ledger_rows_carry_the_exact_cost_in_micros(server: LiveServer) -> None:
    tenant_id, key = server.new_tenant()
    price = {"tenant_id": tenant_id, "model": MODEL, "prompt_per_mtok": "0.15",
             "cached_prompt_per_mtok": "0.075", "completion_per_mtok": "600"}  # fmt: skip
    created = admin_post(server, "/api/admin/prices", price)
    assert (created["prompt_per_mtok"], created["currency"]) == ("0.150000", "USD")
    response = chat(server, key, max_tokens=3)
    row = server.ledger_row(response.headers["x-request-id"])
    uncached = row["prompt_tokens"] - row["cached_tokens"]
    scaled = (
        uncached * 150_000 + row["cached_tokens"] * 75_000 + row["completion_tokens"] * 600_000_000
    )
    assert row["cost_micros"] == (scaled + 500_000) // 1_000_000
    assert row["cost_micros"] >= 600 * row["completion_tokens"]


def test_default_cached_price_is_half_the_prompt_price(server: LiveServer) -> None:
    tenant_id, _ = server.new_tenant()
    price = {"tenant_id": tenant_id, "model": MODEL, "prompt_per_mtok": "2",
             "completion_per_mtok": "4"}  # fmt: skip
    created = admin_post(server, "/api/admin/prices", price)
    assert created["cached_prompt_per_mtok"] == "1.000000"


def test_summary_groups_by_key_and_end_user_with_exact_sums(server: LiveServer) -> None:
    tenant_id, key = server.new_tenant()
    other_key = _second_key(server, tenant_id)
    ids = [
        chat(server, key).headers["x-request-id"],
        chat(server, key, user="alice").headers["x-request-id"],
        chat(server, other_key, user="alice").headers["x-request-id"],
    ]
    rows = [server.ledger_row(request_id) for request_id in ids]
    with server.http(key) as client:
        by_key = client.get("/api/usage", params={"group_by": "key"}).json()
        by_user = client.get("/api/usage", params={"group_by": "end_user", "period": "month"})
    assert by_key["tenant_id"] == tenant_id and by_key["group_by"] == "key"
    expected: dict[str, list[int]] = {}
    for row in rows:
        line = expected.setdefault(row["api_key_id"], [0, 0, 0])
        line[0] += 1
        line[1] += row["prompt_tokens"]
        line[2] += row["completion_tokens"]
    got = {d["group"]: [d["requests"], d["prompt_tokens"], d["completion_tokens"]]
           for d in by_key["data"]}  # fmt: skip
    assert got == expected
    users = {d["group"]: d["requests"] for d in by_user.json()["data"]}
    assert users == {None: 1, "alice": 2}
    assert len({d["period"] for d in by_user.json()["data"]}) == 1


def test_usage_is_tenant_scoped_and_admins_may_name_a_tenant(server: LiveServer) -> None:
    tenant_id, key = server.new_tenant()
    _, other_key = server.new_tenant()
    chat(server, key)
    assert server.services.ledger.flush(10)
    with server.http(other_key) as client:
        assert client.get("/api/usage").json()["data"] == []
        refused = client.get("/api/usage", params={"tenant_id": tenant_id})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "permission_denied"
    with server.http(server.admin_key) as client:
        seen = client.get("/api/usage", params={"tenant_id": tenant_id}).json()
    assert [d["requests"] for d in seen["data"]] == [1]


def test_csv_export_lists_every_row_in_range_with_cost(server: LiveServer) -> None:
    _, key = server.new_tenant()
    ids = [chat(server, key, max_tokens=2).headers["x-request-id"] for _ in range(3)]
    rows = {request_id: server.ledger_row(request_id) for request_id in ids}
    with server.http(key) as client:
        response = client.get("/api/usage/export.csv", params={"from": "2000-01-01"})
        empty = client.get(
            "/api/usage/export.csv", params={"from": "2000-01-01", "to": "2000-02-01"}
        )
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"].startswith('attachment; filename="usage-')
    table = list(csv.DictReader(io.StringIO(response.text)))
    assert list(table[0]) == list(CSV_COLUMNS)
    assert [line["request_id"] for line in table] == ids
    for line in table:
        row = rows[line["request_id"]]
        assert int(line["prompt_tokens"]) == row["prompt_tokens"]
        assert int(line["completion_tokens"]) == row["completion_tokens"]
        assert int(line["total_tokens"]) == row["prompt_tokens"] + row["completion_tokens"]
        assert int(line["cost_micros"]) == row["cost_micros"]
        assert (line["model"], line["status"], line["endpoint"]) == (
            MODEL,
            "ok",
            "chat.completions",
        )
    assert empty.text == ",".join(CSV_COLUMNS) + "\r\n"


def test_a_bad_range_is_a_400_naming_to(server: LiveServer) -> None:
    _, key = server.new_tenant()
    with server.http(key) as client:
        response = client.get("/api/usage", params={"from": "2025-02-01", "to": "2025-01-01"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "to"
