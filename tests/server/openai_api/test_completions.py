"""`/v1/completions` (legacy) through the official `openai` client on the bundled model."""

from __future__ import annotations

import openai
import pytest

from talkloop.backends.engine_backend import EngineBackend
from tests.server.conftest import MODEL

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"


def test_text_prompt_non_streamed(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.model == MODEL
    assert "Paris" in reply.choices[0].text
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 6


def test_token_prompt_equals_text_prompt(
    client: openai.OpenAI, engine_backend: EngineBackend
) -> None:
    token_ids = engine_backend.tokenizer.encode(PROMPT)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=token_ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(token_ids)


def test_streamed_completion_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_legacy_logprobs_shape(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert len(logprobs.token_logprobs or []) == len(logprobs.tokens)
    assert all(len(top) <= 2 and top for top in logprobs.top_logprobs or [])
    offsets = logprobs.text_offset or []
    assert offsets[0] == 0
    assert offsets == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(offsets))]


def test_batched_prompts_and_echo_are_refused_by_name(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=2)
    assert caught.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="a", max_tokens=2, echo=True)
    assert caught.value.param == "echo"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="a", max_tokens=2, logprobs=9)
    assert caught.value.param == "logprobs"
    single = client.completions.create(model=MODEL, prompt=["a"], max_tokens=2)
    assert len(single.choices) == 1
