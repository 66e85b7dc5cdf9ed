"""Schemathesis over the server's own OpenAPI document: every operation, generated valid and
invalid input, checked for 5xx, undocumented status codes and content types, and bodies that do
not match their declared schemas.

One live server on SQLite (the schema is the same on PostgreSQL). Deterministic: a fixed seed and
derandomized generation, so CI sees the same cases every run. Generation is kept cheap by capping
`max_tokens` and `n` in the generated bodies (see `steer_generation`); nothing is excluded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import torch

from talkloop.server import Settings, create_app
from tests.server.conftest import MODEL, LiveServer

MAX_EXAMPLES = 25
SEED = 20240501
MAX_GENERATED_TOKENS = 4
MAX_CHOICES = 2
ADMIN_PATH_PREFIXES = ("/admin/", "/api/admin/")
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("server", ["sqlite"], indirect=True),
]


def openapi_document() -> dict[str, Any]:
    """The app's OpenAPI document, built without starting it (no lifespan, no model)."""
    document: dict[str, Any] = create_app(Settings()).openapi()
    return document


# NOTE: loaded at import, not from the live server fixture: schemathesis's fixture-based loader
# (`schemathesis.pytest.from_fixture`) breaks on pytest 9 (it sets `Node._nodeid`, which pytest 9
# no longer has). `test_live_server_serves_the_tested_document` checks that the server serves
# this same document.
schema = schemathesis.openapi.from_dict(
    openapi_document(),
    config=schemathesis.config.SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "request-timeout": 60,
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
            "phases": {"stateful": {"enabled": False}},
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        }
    ),
)


@pytest.fixture(autouse=True)
def subnormal_floats(server: LiveServer) -> Iterator[None]:
    """Hypothesis refuses to generate floats while subnormals flush to zero, which the engine
    turns on for this thread (`engine.system.setup_torch`); off for the test, then back on."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(True)


def steer_generation(body: Any) -> None:
    """Points a generated body at the served model and caps what costs model time (tokens,
    choices), in place.

    A non-empty string model stays one and only integers above a cap are lowered, so valid input
    stays valid and invalid input (a non-string model, negative, zero, wrong types) stays
    invalid. Without the model, no generated request would reach generation (404 model).
    """
    if not isinstance(body, dict):
        return
    model = body.get("model")
    if isinstance(model, str) and model:  # "" is invalid (minLength 1) and must stay so
        body["model"] = MODEL
    caps = {"max_tokens": MAX_GENERATED_TOKENS, "max_completion_tokens": MAX_GENERATED_TOKENS}
    caps["n"] = MAX_CHOICES
    for name, cap in caps.items():
        value = body.get(name)
        if type(value) is int and value > cap:
            body[name] = cap


def auth_headers(
    case: schemathesis.Case[Any], server: LiveServer, tenant_key: str
) -> dict[str, str]:
    admin = case.path.startswith(ADMIN_PATH_PREFIXES)
    return {"Authorization": f"Bearer {server.admin_key if admin else tenant_key}"}


@schema.parametrize()
def test_api(case: schemathesis.Case[Any], server: LiveServer, tenant: tuple[str, str]) -> None:
    steer_generation(case.body)
    headers = auth_headers(case, server, tenant[1])
    case.call_and_validate(base_url=server.base_url, headers=headers)


def test_live_server_serves_the_tested_document(server: LiveServer) -> None:
    with server.http() as http:
        assert http.get("/openapi.json").json() == openapi_document()
