"""Error shapes the official client sees: 400 naming the param, 401, 404 model, 503 overload."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import MODEL, TINY_MODEL, LiveServer

pytestmark = pytest.mark.integration

HELLO = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"top_p": 0}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1_000_000}, "max_tokens"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 500}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stop": [""]}, "stop"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "regex", "regex": "(unclosed"}}, "response_format"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"extra_body": {"top_k": -1}}, "top_k"),
        ({"extra_body": {"min_p": 2}}, "min_p"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
        ),
        ({"max_tokens": "many"}, "max_tokens"),
    ],
)
def test_bad_parameters_are_400_naming_the_param(
    client: openai.OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    call: dict[str, Any] = {"model": MODEL, "messages": HELLO, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**call)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-17", messages=HELLO)  # type: ignore[arg-type]
    assert (caught.value.code, caught.value.param) == ("model_not_found", "model")
    assert "smollm2" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="character/nobody", prompt="x")


def test_overload_is_a_fast_503_with_retry_after(
    server: LiveServer, tenant: tuple[str, str]
) -> None:
    """The one-at-a-time model is busy with a stream: the next request is refused at once."""
    body = {
        "model": TINY_MODEL,
        "messages": HELLO,
        "max_tokens": 300,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        server.http(tenant[1]) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as busy,
    ):
        assert busy.status_code == 200
        lines = busy.iter_lines()  # NOTE: keep it referenced; closing it disconnects
        next(lines)  # admitted and streaming
        client = server.openai(tenant[1])
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
        response = caught.value.response
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.headers["x-should-retry"] == "true"
        assert response.json()["error"]["code"] == "overloaded"
        rejected_id = response.headers["x-request-id"]
    assert server.ledger_row(rejected_id)["status"] == "rejected"


def test_concurrent_requests_within_limits_all_succeed(client: openai.OpenAI) -> None:
    results: list[str] = []

    def ask() -> None:
        reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
        results.append(reply.choices[0].message.content or "")

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 4


def test_plain_http_body_that_is_not_json(server: LiveServer, tenant: tuple[str, str]) -> None:
    with server.http(tenant[1]) as http:
        response = http.post(
            "/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert isinstance(response, httpx.Response)
