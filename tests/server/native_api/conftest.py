"""Native API fixtures: a tenant with two end-users, and a second tenant, on the live server
(over SQLite and PostgreSQL, as the server conftest parametrizes it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.server.conftest import LiveServer

CARD = {
    "spec": "chara_card_v3",
    "spec_version": "3.0",
    "data": {
        "name": "Mira",
        "description": "{{char}} keeps the lighthouse on Saltmarrow.",
        "personality": "calm, dry humour",
        "first_mes": "Hello, traveller.",
        "alternate_greetings": ["Fog again.", "You came back."],
        "extensions": {"x_custom": {"kept": True}},
    },
}


@dataclass
class Tenant:
    id: str
    key: str
    alice: httpx.Client  # end-user "alice"
    bob: httpx.Client  # end-user "bob", same tenant
    whole: httpx.Client  # no end-user: acts for the whole tenant


def clients(server: LiveServer, key: str) -> Iterator[httpx.Client]:
    yield server.http(key, **{"X-Talkloop-User": "alice"})
    yield server.http(key, **{"X-Talkloop-User": "bob"})
    yield server.http(key)


@pytest.fixture(scope="session")
def tenant_a(server: LiveServer) -> Iterator[Tenant]:
    tenant_id, key = server.new_tenant()
    alice, bob, whole = clients(server, key)
    yield Tenant(tenant_id, key, alice, bob, whole)
    for client in (alice, bob, whole):
        client.close()


@pytest.fixture(scope="session")
def tenant_b(server: LiveServer) -> Iterator[Tenant]:
    tenant_id, key = server.new_tenant()
    alice, bob, whole = clients(server, key)
    yield Tenant(tenant_id, key, alice, bob, whole)
    for client in (alice, bob, whole):
        client.close()


def created(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def sse_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of a finished SSE response."""
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events
