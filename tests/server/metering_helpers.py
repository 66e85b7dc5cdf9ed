"""Helpers shared by the metering tests: chat calls, concurrent bursts, admin settings."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.server.conftest import MODEL, LiveServer

HELLO = [{"role": "user", "content": "Say hi."}]


def chat(server: LiveServer, key: str, max_tokens: int = 1, **body: Any) -> httpx.Response:
    with server.http(key) as client:
        payload = {"model": MODEL, "messages": HELLO, "max_tokens": max_tokens, **body}
        return client.post("/v1/chat/completions", json=payload)


def burst(server: LiveServer, key: str, count: int, max_tokens: int = 1) -> list[httpx.Response]:
    """`count` chat requests sent at once from as many threads."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: chat(server, key, max_tokens), range(count)))


def admin_put(server: LiveServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    with server.http(server.admin_key) as client:
        response = client.put(path, json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def admin_post(server: LiveServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    with server.http(server.admin_key) as client:
        response = client.post(path, json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result
