"""The OpenAI wire mapping: request bodies, SSE chunks (talkloop and vLLM shapes), errors.

Pure functions on recorded bodies; `test_remote.py` runs the same code against real servers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest

from talkloop.backends.base import (
    BackendError,
    BackendOverloadedError,
    GenerationChunk,
    GenerationRequest,
    Usage,
)
from talkloop.backends.openai_wire import (
    StreamParser,
    error_from_response,
    request_body,
    retry_after_s,
)
from talkloop.engine.errors import InvalidRequestError
from talkloop.engine.outputs import TokenLogprob
from talkloop.engine.sampling_params import SamplingParams


def _data(event: Mapping[str, object]) -> str:
    return f"data: {json.dumps(event)}"


def test_a_default_chat_request_carries_only_openai_fields() -> None:
    request = GenerationRequest("r", SamplingParams(), messages=[{"role": "user", "content": "hi"}])
    assert request_body(request, "m") == (
        "/chat/completions",
        {
            "model": "m",
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 256,
            "temperature": 1.0,
            "top_p": 1.0,
            "n": 1,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )


def test_every_sampling_parameter_is_mapped() -> None:
    params = SamplingParams(
        max_tokens=7,
        temperature=0.5,
        top_k=40,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.2,
        frequency_penalty=-0.3,
        logit_bias={42: -100.0},
        seed=3,
        n=2,
        logprobs=2,
        stop=("\n",),
        stop_token_ids=(2,),
        ignore_eos=True,
    )
    path, body = request_body(GenerationRequest("r", params, prompt=[1, 2, 3]), "m")
    assert path == "/completions"
    assert body == {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "n": 2,
        "presence_penalty": 0.2,
        "frequency_penalty": -0.3,
        "seed": 3,
        "stop": ["\n"],
        "logit_bias": {"42": -100.0},
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "stop_token_ids": [2],
        "return_tokens_as_token_ids": True,
        "prompt": [1, 2, 3],
        "logprobs": 2,
    }
    chat = GenerationRequest(
        "r",
        SamplingParams(logprobs=0),
        messages=[{"role": "assistant", "content": "Once"}],
        add_generation_prompt=False,
        continue_final_message=True,
    )
    _, body = request_body(chat, "m")
    assert (body["logprobs"], body["top_logprobs"]) == (True, 0)
    assert (body["add_generation_prompt"], body["continue_final_message"]) == (False, True)


def test_chat_stream_holds_the_finish_chunk_for_the_usage() -> None:
    parser = StreamParser(chat=True)
    lines = [
        _data({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        "",
        _data({"choices": [{"index": 0, "delta": {"content": "Par"}, "finish_reason": None}]}),
        ": keep-alive",
        _data({"choices": [{"index": 0, "delta": {"content": "is"}, "finish_reason": None}]}),
        _data({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        _data(
            {
                "choices": [],
                "usage": {
                    "prompt_tokens": 9,
                    "completion_tokens": 2,
                    "prompt_tokens_details": {"cached_tokens": 8},
                },
            }
        ),
        "data: [DONE]",
    ]
    chunks = [chunk for line in lines for chunk in parser.feed_line(line)]
    assert chunks == [GenerationChunk(0, "Par"), GenerationChunk(0, "is")]
    assert parser.finish(Usage(0, 0)) == [
        GenerationChunk(0, "", finish_reason="stop", usage=Usage(9, 2, 8))
    ]


def test_vllm_token_id_logprobs_become_token_logprobs_and_no_usage_uses_the_fallback() -> None:
    parser = StreamParser(chat=True)
    logprobs = {
        "content": [
            {
                "token": "token_id:42",
                "logprob": -0.5,
                "top_logprobs": [
                    {"token": "token_id:42", "logprob": -0.5},
                    {"token": "token_id:7", "logprob": -1.5},
                ],
            }
        ]
    }
    line = _data({"choices": [{"index": 1, "delta": {"content": "x"}, "logprobs": logprobs}]})
    expected = TokenLogprob(42, -0.5, ((42, -0.5), (7, -1.5)))
    assert parser.feed_line(line) == [GenerationChunk(1, "x", (42,), (expected,))]
    assert parser.finish(Usage(5, 1)) == [GenerationChunk(0, "", usage=Usage(5, 1))]


def test_legacy_completion_logprobs_without_token_ids_are_dropped() -> None:
    parser = StreamParser(chat=False)
    choice = {
        "index": 0,
        "text": " blue",
        "logprobs": {"tokens": [" blue"], "token_logprobs": [-0.1], "top_logprobs": None},
    }
    assert parser.feed_line(_data({"choices": [choice]})) == [GenerationChunk(0, " blue")]


def test_an_error_event_mid_stream_is_a_backend_error() -> None:
    parser = StreamParser(chat=True)
    event = {"error": {"message": "the engine loop stopped", "type": "server_error"}}
    with pytest.raises(BackendError, match="failed mid-stream: the engine loop stopped"):
        parser.feed_line(_data(event))


def test_http_errors_map_onto_the_backend_hierarchy() -> None:
    openai_400 = json.dumps({"error": {"message": "bad n", "param": "n"}}).encode()
    error = error_from_response(400, openai_400, {})
    assert isinstance(error, InvalidRequestError) and error.param == "n" and str(error) == "bad n"
    vllm_400 = json.dumps({"object": "error", "message": "too long", "code": 400}).encode()
    error = error_from_response(400, vllm_400, {})
    assert isinstance(error, InvalidRequestError) and error.param is None
    limited = error_from_response(429, b'{"error": {"message": "slow down"}}', {"retry-after": "7"})
    assert isinstance(limited, BackendOverloadedError) and limited.retry_after_s == 7.0
    assert str(limited) == "the remote server is busy (429): slow down"
    broken = error_from_response(502, b"<html>bad gateway</html>", {})
    assert type(broken) is BackendError
    assert str(broken) == "the remote server answered 502: <html>bad gateway</html>"


def test_retry_after_reads_seconds_and_dates() -> None:
    assert retry_after_s(None) == 1.0
    assert retry_after_s("2.5") == 2.5
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert retry_after_s("soon") == 1.0
