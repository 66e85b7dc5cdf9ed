"""OpenAI request fields -> engine `SamplingParams`; OpenAI's own rules checked first.

The engine validates ranges (its errors name the field); this module checks what only the
API defines: `top_logprobs` needs `logprobs`, `stream_options` needs `stream`, string token ids.
"""

from __future__ import annotations

from typing import Any

from talkloop.engine.errors import InvalidRequestError
from talkloop.engine.sampling_params import SamplingParams
from talkloop.engine.structured.spec import StructuredOutput
from talkloop.server.errors import BadRequestError
from talkloop.server.openai_api.schemas import ChatCompletionRequest, SamplingFields

MAX_TOP_LOGPROBS = 20


def logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
    """`{"50256": -100}` -> `{50256: -100.0}` (JSON object keys are strings)."""
    bias: dict[int, float] = {}
    for key, value in (raw or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise BadRequestError(
                f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                param="logit_bias",
            ) from None
        bias[token_id] = value
    return bias


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def check_stream_options(body: SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:
        raise BadRequestError(
            "stream_options is only allowed when stream is true", param="stream_options"
        )


def chat_logprobs(body: ChatCompletionRequest) -> int | None:
    """The engine's `logprobs` (top-k per token) for a chat request, or None."""
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
        raise BadRequestError(
            f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {body.top_logprobs}",
            param="top_logprobs",
        )
    return (body.top_logprobs or 0) if body.logprobs else None


def structured_output(body: ChatCompletionRequest) -> StructuredOutput | None:
    """The constraint `response_format` asks for (None for text); errors name the field."""
    if body.response_format is None:
        return None
    try:
        return StructuredOutput.from_response_format(body.response_format.model_dump())
    except InvalidRequestError as exc:
        raise BadRequestError(str(exc), param="response_format") from None


def sampling_params(
    body: SamplingFields,
    max_tokens: int | None,
    default_max_tokens: int,
    logprobs: int | None,
    structured: StructuredOutput | None = None,
) -> SamplingParams:
    check_stream_options(body)
    given: dict[str, Any] = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
        "seed": body.seed,
    }
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        n=body.n,
        stop=stop_strings(body.stop),
        logit_bias=logit_bias(body.logit_bias),
        logprobs=logprobs,
        ignore_eos=body.ignore_eos,
        structured=structured,
        **{name: value for name, value in given.items() if value is not None},
    )
