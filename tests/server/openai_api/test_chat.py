"""`/v1/chat/completions` through the official `openai` client on the bundled model.

Every parameter the endpoint takes is exercised here; error shapes are in test_errors.py.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from talkloop.backends.engine_backend import EngineBackend
from tests.server.conftest import MODEL

pytestmark = pytest.mark.integration

HELLO = [{"role": "user", "content": "What is the capital of France?"}]
COUNT = [{"role": "user", "content": "Write a short poem about the sea."}]


def _text(client: openai.OpenAI, **kwargs: Any) -> str:
    reply = client.chat.completions.create(model=MODEL, **{"messages": HELLO, **kwargs})
    return reply.choices[0].message.content or ""


def test_non_streamed_reply_has_openai_shape(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    assert reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens_details is not None


def test_streamed_reply_matches_openai_framing(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({chunk.id for chunk in chunks}) == 1
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] in (["length"], ["stop"]) and finishes[-1] is not None
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(chunk.usage is None for chunk in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert text == _text(client, max_tokens=8, temperature=0)
    assert chunks[-1].usage.completion_tokens <= 8


def test_stream_without_usage_option_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=4, temperature=0, stream=True
        )
    )
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)


def test_n_choices_each_get_a_role_and_one_finish_reason(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=6, n=2, seed=3, stream=True
        )
    )
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert [c.finish_reason for c in mine if c.finish_reason] in (["length"], ["stop"])
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]


def test_max_completion_tokens_wins_over_max_tokens(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=COUNT,
        max_tokens=9,
        max_completion_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    assert reply.choices[0].finish_reason == "length"
    default = client.chat.completions.create(
        model=MODEL, messages=COUNT, extra_body={"ignore_eos": True}
    )
    assert default.usage is not None and default.usage.completion_tokens == 16  # server default


def test_stop_string_and_list_end_the_reply_before_the_stop(client: openai.OpenAI) -> None:
    full = _text(client, messages=COUNT, max_tokens=24, temperature=0)
    word = full.split()[2]
    for stop in (word, ["zzzz", word]):
        reply = client.chat.completions.create(
            model=MODEL, messages=COUNT, max_tokens=24, temperature=0, stop=stop
        )
        text = reply.choices[0].message.content or ""
        assert word not in text and full.startswith(text)
        assert reply.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    kwargs = {"messages": COUNT, "max_tokens": 12, "temperature": 1.0, "seed": 1234}
    assert _text(client, **kwargs) == _text(client, **kwargs)


def test_every_sampling_knob_is_accepted(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=4,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=1,
        user="knob-tester",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "unknown_x": 1},
    )
    assert reply.choices[0].message.content


def test_logit_bias_forces_and_bans_tokens(
    client: openai.OpenAI, engine_backend: EngineBackend
) -> None:
    tokenizer = engine_backend.tokenizer
    [forced] = tokenizer.encode(" banana", add_special_tokens=False)[:1]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=3,
        temperature=0,
        logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].message.content == tokenizer.decode([forced] * 3)
    greedy = _text(client, max_tokens=1, temperature=0)
    [first] = tokenizer.encode(greedy, add_special_tokens=False)[:1]
    banned = _text(client, max_tokens=1, temperature=0, logit_bias={str(first): -100})
    assert banned != greedy


def test_logprobs_have_openai_shape_with_bytes(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert reply.usage is not None and len(entries) == reply.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    plain = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=2, temperature=0, logprobs=True
    )
    assert plain.choices[0].logprobs is not None
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content or [])
    no = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert no.choices[0].logprobs is None


def test_streamed_logprobs_ride_on_content_deltas(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=4,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            stream=True,
        )
    )
    content = [c.choices[0] for c in chunks[1:] if c.choices[0].delta.content]
    assert content and all(c.logprobs is not None for c in content)
    tokens = [e.token for c in content for e in (c.logprobs.content or [])]  # type: ignore[union-attr]
    assert "".join(tokens) == "".join(c.delta.content or "" for c in content)


def test_system_developer_roles_and_text_parts_are_understood(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "You answer with one word."},
            {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]},
        ],
        max_tokens=6,
        temperature=0,
    )
    assert "Paris" in (reply.choices[0].message.content or "")
