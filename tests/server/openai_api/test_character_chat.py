"""`character/<id>` on /v1/chat/completions with server-side history (header
`X-Talkloop-Conversation`), through the official `openai` client: two turns, streamed and not,
read back from the native API; bad uses; private characters stay their end-user's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from talkloop.server.openai_api.character_chat import CONVERSATION_HEADER
from tests.server.conftest import MODEL, LiveServer
from tests.server.native_api.conftest import CARD

pytestmark = pytest.mark.integration

SHORT: dict[str, Any] = {"max_tokens": 3, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def tenant(server: LiveServer) -> Iterator[dict[str, Any]]:
    """A tenant, alice's private character, and alice's and bob's clients."""
    _, key = server.new_tenant()
    alice = server.http(key, **{"X-Talkloop-User": "alice"})
    character = alice.post("/api/characters", json={"card": CARD}).json()["id"]
    yield {
        "character": f"character/{character}",
        "alice_http": alice,
        "alice": server.openai(key, default_headers={"X-Talkloop-User": "alice"}),
        "bob": server.openai(key, default_headers={"X-Talkloop-User": "bob"}),
        "whole": server.openai(key),
    }
    alice.close()


def stored(client: httpx.Client, conversation_id: str) -> list[tuple[str, str, str]]:
    url = f"/api/conversations/{conversation_id}/messages?branch=active&limit=100"
    response = client.get(url)
    assert response.status_code == 200, response.text
    return [(m["role"], m["content"], m["status"]) for m in response.json()["data"]]


def turn(tenant: dict[str, Any], conversation: str, messages: list[Any]) -> tuple[str, Any]:
    raw = tenant["alice"].chat.completions.with_raw_response.create(
        model=tenant["character"],
        messages=messages,
        extra_headers={CONVERSATION_HEADER: conversation},
        **SHORT,
    )
    return raw.headers[CONVERSATION_HEADER], raw.parse()


def test_two_turns_keep_the_history_on_the_server(
    server: LiveServer, tenant: dict[str, Any]
) -> None:
    first = [{"role": "user", "content": "What is your name?"}]
    conversation, reply1 = turn(tenant, "new", first)
    assert conversation.startswith("conv") and reply1.model == tenant["character"]
    text1 = reply1.choices[0].message.content
    assert text1 and reply1.usage.completion_tokens == 3
    resent = [*first, {"role": "assistant", "content": "ignored"}]
    second = [*resent, {"role": "user", "content": "And the lighthouse?"}]
    same, reply2 = turn(tenant, conversation, second)
    assert same == conversation
    text2 = reply2.choices[0].message.content
    assert stored(tenant["alice_http"], conversation) == [
        ("assistant", "Hello, traveller.", "complete"),
        ("user", "What is your name?", "complete"),
        ("assistant", text1, "complete"),
        ("user", "And the lighthouse?", "complete"),
        ("assistant", text2, "complete"),
    ]
    # the second prompt held the first exchange: greeting, question, answer, new question
    assert reply2.usage.prompt_tokens > reply1.usage.prompt_tokens + 3
    row = server.ledger_row(reply2.id.removeprefix("chatcmpl-"))
    assert (row["endpoint"], row["character_id"]) == ("chat.completions", tenant["character"][10:])


def stream_turn(tenant: dict[str, Any], conversation: str, content: str) -> tuple[str, str]:
    raw = tenant["alice"].chat.completions.with_raw_response.create(
        model=tenant["character"],
        messages=[{"role": "user", "content": content}],
        stream=True,
        extra_headers={CONVERSATION_HEADER: conversation},
        **SHORT,
    )
    chunks = list(raw.parse())
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    assert finish == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return raw.headers[CONVERSATION_HEADER], text


def test_streamed_turns_are_saved_as_they_complete(tenant: dict[str, Any]) -> None:
    conversation, text1 = stream_turn(tenant, "new", "Hi there")
    same, text2 = stream_turn(tenant, conversation, "Tell me more")
    assert same == conversation and text1 and text2
    assert stored(tenant["alice_http"], conversation) == [
        ("assistant", "Hello, traveller.", "complete"),
        ("user", "Hi there", "complete"),
        ("assistant", text1, "complete"),
        ("user", "Tell me more", "complete"),
        ("assistant", text2, "complete"),
    ]


def test_bad_uses_are_refused_and_nothing_is_stored(tenant: dict[str, Any]) -> None:
    conversation, _ = turn(tenant, "new", [{"role": "user", "content": "One"}])
    before = stored(tenant["alice_http"], conversation)
    alice, hello = tenant["alice"], [{"role": "user", "content": "Hello"}]
    cases: list[tuple[dict[str, Any], type[openai.APIStatusError], str | None]] = [
        ({"model": MODEL}, openai.BadRequestError, "model"),
        ({"n": 2}, openai.BadRequestError, "n"),
        ({"messages": [{"role": "system", "content": "x"}]}, openai.BadRequestError, "messages"),
    ]
    for overrides, error, param in cases:
        body = {"model": tenant["character"], "messages": hello, **SHORT, **overrides}
        with pytest.raises(error) as caught:
            alice.chat.completions.create(**body, extra_headers={CONVERSATION_HEADER: conversation})
        assert caught.value.body["param"] == param  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.create(
            model=tenant["character"],
            messages=hello,
            extra_headers={CONVERSATION_HEADER: "conv_nope"},
            **SHORT,
        )
    assert stored(tenant["alice_http"], conversation) == before


def test_private_character_is_not_found_for_another_end_user(tenant: dict[str, Any]) -> None:
    hello = [{"role": "user", "content": "Hello"}]
    for headers in ({}, {CONVERSATION_HEADER: "new"}):
        with pytest.raises(openai.NotFoundError) as caught:
            tenant["bob"].chat.completions.create(
                model=tenant["character"], messages=hello, extra_headers=headers, **SHORT
            )
        assert caught.value.code == "model_not_found"
    whole = tenant["whole"].chat.completions.create(
        model=tenant["character"], messages=hello, **SHORT
    )
    assert whole.usage is not None and whole.usage.completion_tokens == 3
