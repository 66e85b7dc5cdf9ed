"""`response_format` through the openai SDK: replies parse and validate, streamed or not."""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import openai

from tests.server.conftest import MODEL

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "population_millions": {"type": "number", "minimum": 0, "maximum": 50},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population_millions", "capital"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Give facts about Paris as JSON."}]


def test_json_schema_reply_validates(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=80,
        temperature=0,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
    )
    data = json.loads(reply.choices[0].message.content or "")
    assert jsonschema_rs.validator_for(SCHEMA).is_valid(data), data


def test_sampled_schema_reply_streams_valid_json(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=120,
        temperature=0.7,
        seed=1,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert jsonschema_rs.validator_for(SCHEMA).is_valid(json.loads(text)), text


def test_json_object_reply_is_an_object(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_object"},
    )
    # A 135M model can ramble inside an open-ended object until max_tokens; what the grammar
    # guarantees is the object's shape from the first token, and validity when it closes.
    content = reply.choices[0].message.content or ""
    assert content.startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def test_choice_extension_picks_one(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
        extra_body={"response_format": {"type": "choice", "choices": ["yes", "no"]}},
    )
    assert reply.choices[0].message.content in ("yes", "no")
