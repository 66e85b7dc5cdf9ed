"""The error hierarchy mapped onto OpenAI's envelope, statuses and retry headers."""

from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from talkloop.backends.base import BackendError, BackendOverloadedError
from talkloop.engine.errors import InvalidRequestError
from talkloop.server.errors import (
    ConflictError,
    NotFoundError,
    QuotaExceededError,
    RateLimitedError,
    as_server_error,
    error_response,
    install_error_handlers,
)


def _response(exc: Exception) -> tuple[int, dict[str, object], dict[str, str]]:
    response = error_response(as_server_error(exc))
    return response.status_code, json.loads(response.body), dict(response.headers)


def test_engine_validation_error_is_400_naming_the_param() -> None:
    status, body, headers = _response(InvalidRequestError("top_p must be in (0, 1]", "top_p"))
    assert status == 400
    assert body == {
        "error": {
            "message": "top_p must be in (0, 1]",
            "type": "invalid_request_error",
            "param": "top_p",
            "code": None,
        }
    }
    assert headers["x-should-retry"] == "false"


def test_overloaded_backend_is_503_with_retry_after() -> None:
    status, body, headers = _response(BackendOverloadedError("busy", retry_after_s=2.2))
    assert status == 503
    assert body["error"] == {
        "message": "busy",
        "type": "server_error",
        "param": None,
        "code": "overloaded",
    }
    assert (headers["retry-after"], headers["x-should-retry"]) == ("3", "true")


def test_rate_limit_is_retryable_but_quota_is_not() -> None:
    status, _, headers = _response(RateLimitedError("slow down", retry_after_s=0.2))
    assert (status, headers["retry-after"], headers["x-should-retry"]) == (429, "1", "true")
    status, body, headers = _response(QuotaExceededError("monthly quota used up"))
    assert (status, headers["x-should-retry"]) == (429, "false")
    assert "retry-after" not in headers
    assert body["error"]["type"] == "insufficient_quota"  # type: ignore[index]


def test_not_found_and_conflict_carry_their_codes() -> None:
    assert _response(NotFoundError("no model", param="model", code="model_not_found"))[:2] == (
        404,
        {
            "error": {
                "message": "no model",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
        },
    )
    assert _response(ConflictError("exists"))[0] == 409


def test_backend_failure_and_bugs_are_500_without_internals() -> None:
    assert _response(BackendError("engine broke"))[0] == 500
    status, body, _ = _response(RuntimeError("secret internals"))
    assert status == 500
    assert "secret internals" not in str(body)


class Item(BaseModel):
    name: str
    tags: list[int]


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/items")
    def create(item: Item) -> dict[str, str]:
        return {"name": item.name}

    return app


def test_validation_errors_are_400_naming_the_field_path() -> None:
    client = TestClient(_app())
    response = client.post("/items", json={"name": "x", "tags": [1, "two"]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tags[1]"
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("invalid value for 'tags[1]'")
    missing = client.post("/items", json={"tags": []}).json()["error"]
    assert missing["param"] == "name"


def test_malformed_json_and_unknown_routes_use_the_envelope() -> None:
    client = TestClient(_app())
    response = client.post("/items", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert client.get("/items").status_code == 405
