"""A backend failure after the stream started: an in-band `error` event, then `[DONE]`.

The engine cannot be made to fail on demand, so a scripted backend drives the same app; the
official client must surface the event as an `APIError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from talkloop.server import Settings, create_app
from talkloop.server.services import Services
from talkloop.server.store import PlatformStore, TenantStore
from tests.server.fakes import FakeBackend

HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture
def app_client(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    settings = Settings(data_dir=tmp_path, load_bundled_characters=False)
    keys: list[str] = []
    app = create_app(settings, FakeBackend(fail_after=2), on_admin_key=keys.append)
    with TestClient(app) as http:
        yield http, keys[0]


def _usage(services: Services, request_id: str) -> list[tuple[str, int]]:
    assert services.ledger.flush()
    with services.db.session() as session:
        tenant = PlatformStore(session).tenant_by_name("default")
        assert tenant is not None
        row = TenantStore(session, tenant.id).usage.find(request_id)
        return [] if row is None else [(row.status, row.completion_tokens)]


def test_failure_mid_stream_is_an_error_event_then_done(
    app_client: tuple[TestClient, str],
) -> None:
    http, key = app_client
    body = {"model": "fake", "messages": HELLO, "stream": True}
    response = http.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200
    events = [event for event in response.text.split("\n\n") if event]
    assert len(events) == 5  # role, "Hello", " there", error, [DONE]
    assert events[-2] == (
        'data: {"error":{"message":"the model backend failed: the fake backend broke",'
        '"type":"server_error","param":null,"code":"backend_error"}}'
    )
    assert events[-1] == "data: [DONE]"
    services: Services = http.app.state.services  # type: ignore[attr-defined]
    assert _usage(services, response.headers["x-request-id"]) == [("error", 2)]


def test_the_openai_client_raises_on_the_error_event(app_client: tuple[TestClient, str]) -> None:
    http, key = app_client
    client = openai.OpenAI(
        api_key=key, base_url="http://testserver/v1", http_client=http, max_retries=0
    )
    stream = client.chat.completions.create(model="fake", messages=HELLO, stream=True)  # type: ignore[arg-type]
    with pytest.raises(openai.APIError, match="the fake backend broke"):
        list(stream)
