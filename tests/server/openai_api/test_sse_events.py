"""The streamed chunks' exact bytes: text tokens take a template fast path (`TextEvent`) that
must render what the general path renders, for any text (quotes, escapes, non-ASCII)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from talkloop.backends.base import GenerationChunk, Usage
from talkloop.server.auth import KeyScope, Principal
from talkloop.server.model_registry import ResolvedModel
from talkloop.server.openai_api.calls import Call
from talkloop.server.openai_api.chat import ChatStream
from talkloop.server.openai_api.completions import CompletionStream
from talkloop.server.openai_api.schemas import ChatCompletionRequest, CompletionRequest
from tests.server.fakes import FakeBackend

TEXTS = ["Hello", ' "quoted" \\ back', "line\nbreak\ttab", "café ☕ 雨", "\x00\x1f", "</script>"]


class ScriptedGeneration:
    def __init__(self, chunks: list[GenerationChunk]) -> None:
        self._chunks = chunks
        self.usage = Usage(7, len(chunks), 3)

    async def chunks(self) -> AsyncIterator[GenerationChunk]:
        for chunk in self._chunks:
            yield chunk


def _call() -> Call:
    principal = Principal("tenant", "key", KeyScope.USER)
    return Call("req1", principal, ResolvedModel('m "x"', FakeBackend()), 1_700_000_000)


def _script(n: int) -> list[GenerationChunk]:
    chunks = [GenerationChunk(i % n, text, (i,)) for i, text in enumerate(TEXTS)]
    return [*chunks, GenerationChunk(0, "", (), finish_reason="stop")]


def _events(stream: Any, generation: ScriptedGeneration) -> list[dict[str, Any]]:
    async def collect() -> list[str]:
        return [event async for event in stream.events(generation)]

    events = asyncio.run(collect())
    assert events[-1] == "data: [DONE]\n\n"
    parsed = []
    for event in events[:-1]:
        assert event.startswith("data: ") and event.endswith("\n\n")
        compact = json.dumps(json.loads(event[6:]), ensure_ascii=False, separators=(",", ":"))
        assert event[6:-2] == compact  # one compact JSON document per event
        parsed.append(json.loads(event[6:]))
    return parsed


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("n", [1, 2])
def test_chat_text_chunks_have_the_full_chunk_shape(include_usage: bool, n: int) -> None:
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "n": n,
            "stream_options": {"include_usage": include_usage},
        }
    )
    events = _events(ChatStream(_call(), body, None), ScriptedGeneration(_script(n)))
    envelope = {
        "id": "chatcmpl-req1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": 'm "x"',
        "system_fingerprint": None,
    }
    usage = {"usage": None} if include_usage else {}
    texts = events[n : n + len(TEXTS)]
    for i, (event, text) in enumerate(zip(texts, TEXTS, strict=True)):
        choice = {"index": i % n, "delta": {"content": text}, "logprobs": None}
        assert event == {**envelope, "choices": [{**choice, "finish_reason": None}], **usage}
        assert list(event) == [*envelope, "choices", *usage]  # key order as the general path
    finish = events[n + len(TEXTS)]
    assert finish["choices"][0]["finish_reason"] == "stop"


def test_completion_text_chunks_have_the_full_chunk_shape() -> None:
    body = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "stream": True})
    events = _events(CompletionStream(_call(), body, None), ScriptedGeneration(_script(1)))
    for event, text in zip(events, TEXTS, strict=False):
        assert event["object"] == "text_completion" and event["model"] == 'm "x"'
        assert event["choices"] == [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        ]
    assert events[len(TEXTS)]["choices"][0]["finish_reason"] == "stop"
