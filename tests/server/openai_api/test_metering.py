"""The usage ledger through the live server: one exact row per request, however it ends.

Rows are written off the response path; a client that disconnects mid-stream is still
metered (with the tokens generated until then) and its engine request is aborted, freeing
its KV cache blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from talkloop.backends.base import GenerationRequest
from talkloop.backends.engine_backend import EngineBackend
from talkloop.engine.sampling_params import SamplingParams
from tests.server.conftest import MODEL, LiveServer

pytestmark = pytest.mark.integration

HELLO = [{"role": "user", "content": "What is the capital of France?"}]
LONG = {"max_tokens": 300, "ignore_eos": True}


def _wait_for(check: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def _prompt_tokens(backend: EngineBackend, messages: list[dict[str, str]]) -> int:
    request = GenerationRequest("count", SamplingParams(), messages=messages)
    return len(backend.prompt_token_ids(request))


def _engine_idle(backend: EngineBackend) -> bool:
    stats = backend.stats()
    return stats["requests_in_flight"] == 0 and stats["kv_cache_usage_perc"] == 0.0


def test_non_streamed_request_is_metered_exactly(server: LiveServer) -> None:
    tenant_id, secret = server.new_tenant()
    raw = server.openai(secret).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=5,
        user="alice",  # type: ignore[arg-type]
    )
    usage = raw.parse().usage
    assert usage is not None
    row = server.ledger_row(raw.headers["x-request-id"])
    expected = {
        "request_id": raw.headers["x-request-id"],
        "tenant_id": tenant_id,
        "api_key_id": server.key_id(secret),
        "end_user": "alice",
        "model": MODEL,
        "character_id": None,
        "endpoint": "chat.completions",
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": usage.prompt_tokens_details.cached_tokens,  # type: ignore[union-attr]
        "completion_tokens": usage.completion_tokens,
        "status": "ok",
    }
    assert {name: row[name] for name in expected} == expected
    assert row["latency_ms"] > 0


def test_streamed_request_is_metered_with_the_usage_chunk(server: LiveServer) -> None:
    _, secret = server.new_tenant()
    client = server.openai(secret, default_headers={"X-Talkloop-User": "from-header"})
    with client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = list(response.parse())
    usage = chunks[-1].usage
    assert usage is not None
    row = server.ledger_row(request_id)
    assert (row["prompt_tokens"], row["completion_tokens"], row["status"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
        "ok",
    )
    assert row["end_user"] == "from-header"
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="Hi", max_tokens=2, user="from-body"
    )
    row = server.ledger_row(raw.headers["x-request-id"])
    assert (row["endpoint"], row["end_user"]) == ("completions", "from-body")


def test_disconnect_mid_stream_is_metered_and_frees_the_engine(
    server: LiveServer, engine_backend: EngineBackend
) -> None:
    tenant_id, secret = server.new_tenant()
    body = {"model": MODEL, "messages": HELLO, "stream": True, **LONG}
    with server.http(secret) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            request_id = response.headers["x-request-id"]
            lines = response.iter_lines()
            content = [line for _, line in zip(range(8), lines, strict=False) if line]
        assert len(content) == 4  # role + 3 content deltas, then the client hangs up
    rows = _wait_for(lambda: server.ledger_rows(request_id=request_id))
    [row] = rows
    assert row["status"] == "client_disconnected"
    assert row["tenant_id"] == tenant_id
    assert 3 <= row["completion_tokens"] < 300
    assert row["prompt_tokens"] == _prompt_tokens(engine_backend, HELLO)
    assert _wait_for(lambda: _engine_idle(engine_backend)), engine_backend.stats()


def test_disconnect_before_a_non_streamed_reply_is_metered(
    server: LiveServer, engine_backend: EngineBackend
) -> None:
    _, secret = server.new_tenant()
    user = f"impatient-{server.db_kind}"
    body = {"model": MODEL, "messages": HELLO, "user": user, **LONG}
    with server.http(secret) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=body, timeout=1.0)
    [row] = _wait_for(lambda: server.ledger_rows(end_user=user))
    assert row["status"] == "client_disconnected"
    assert 0 < row["completion_tokens"] < 300
    assert _wait_for(lambda: _engine_idle(engine_backend)), engine_backend.stats()


def test_character_requests_meter_the_backend_model_and_character(server: LiveServer) -> None:
    client = server.openai(server.admin_key)  # the default tenant holds the bundled characters
    raw = client.chat.completions.with_raw_response.create(
        model="character/hush",
        messages=HELLO,
        max_tokens=2,  # type: ignore[arg-type]
    )
    assert raw.parse().model == "character/hush"
    row = server.ledger_row(raw.headers["x-request-id"])
    assert row["model"] == MODEL
    assert row["character_id"] is not None and row["character_id"].startswith("chr_")


def test_rejected_requests_are_metered_without_tokens(server: LiveServer) -> None:
    _, secret = server.new_tenant()
    client = server.openai(secret)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=1_000_000,  # type: ignore[arg-type]
        )
    rows = server.ledger_rows(api_key_id=server.key_id(secret))
    assert [(r["status"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        ("rejected", 0, 0)
    ]
