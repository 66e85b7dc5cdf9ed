"""`POST /v1/completions` (legacy): a text or token-id prompt, streamed or not.

One prompt per request (a batch of prompts is refused, as is `echo`); `logprobs` uses the
legacy shape (tokens, token_logprobs, top_logprobs, text_offset).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from talkloop.backends.base import GenerationChunk, GenerationRequest
from talkloop.engine.outputs import TokenLogprob
from talkloop.server.auth import PrincipalDep
from talkloop.server.deps import ServicesDep
from talkloop.server.errors import BadRequestError, as_server_error
from talkloop.server.openai_api import character_chat, logprobs, sampling
from talkloop.server.openai_api.calls import (
    SSE_DONE,
    Call,
    TextEvent,
    resolve_call,
    sse,
    sse_response,
    usage_body,
)
from talkloop.server.openai_api.generation import (
    Generation,
    gather_choices,
    respond_unless_disconnected,
)
from talkloop.server.openai_api.schemas import CompletionRequest

router = APIRouter()
ENDPOINT = "completions"
MAX_LEGACY_LOGPROBS = 5


def single_prompt(body: CompletionRequest) -> str | list[int]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise BadRequestError(
                f"send one prompt per request; got a batch of {len(prompt)}", param="prompt"
            )
        return prompt[0]
    return prompt  # type: ignore[return-value]


def legacy_logprobs(body: CompletionRequest) -> int | None:
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LEGACY_LOGPROBS:
        raise BadRequestError(
            f"logprobs must be in [0, {MAX_LEGACY_LOGPROBS}], got {body.logprobs}",
            param="logprobs",
        )
    return body.logprobs


@router.post("/completions", response_model=None)
async def create_completion(
    body: CompletionRequest, request: Request, principal: PrincipalDep, services: ServicesDep
) -> Response:
    call = await resolve_call(request, services, principal.acting_for(body.user), body.model)
    await character_chat.check_visible(services, call)
    if body.echo:
        raise BadRequestError("echo is not supported", param="echo")
    top = legacy_logprobs(body)
    params = sampling.sampling_params(
        body, body.max_tokens, services.settings.default_max_tokens, top
    )
    token_bytes = logprobs.token_bytes_for(call.model.backend) if top is not None else None
    generation_request = GenerationRequest(call.request_id, params, prompt=single_prompt(body))
    meter = call.meter(services, ENDPOINT)
    generation = await Generation.start(call.model.backend, generation_request, meter)
    completion = CompletionStream(call, body, token_bytes)
    if body.stream:
        return sse_response(completion.events(generation), generation)
    return await respond_unless_disconnected(request, completion.collect(generation))


def _text_choice(index: Any, text: str) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": None}


class CompletionStream:
    def __init__(
        self, call: Call, body: CompletionRequest, token_bytes: logprobs.TokenBytes | None
    ) -> None:
        self.call = call
        self.id = f"cmpl-{call.request_id}"
        self.n = body.n
        self.include_usage = bool(
            body.stream and body.stream_options and body.stream_options.include_usage
        )
        self.token_bytes = token_bytes
        self.offsets = [0] * body.n  # text emitted so far per choice, for text_offset
        self._text_event = TextEvent(self._body, _text_choice)

    def _body(
        self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.call.created,
            "model": self.call.model.name,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage
        return body

    def _logprobs(self, items: Sequence[TokenLogprob] | None, offset: int) -> dict[str, Any] | None:
        if self.token_bytes is None:
            return None
        return logprobs.completion_logprobs(items or (), self.token_bytes, offset)

    def _event(self, chunk: GenerationChunk) -> str:
        """A chunk's SSE event (from the template when it has neither logprobs nor a finish
        reason: most tokens)."""
        lp = self._logprobs(chunk.logprobs, self.offsets[chunk.index])
        self.offsets[chunk.index] += len(chunk.text)
        if lp is None and chunk.finish_reason is None:
            return self._text_event(chunk.index, chunk.text)
        choice = _text_choice(chunk.index, chunk.text)
        choice.update(logprobs=lp, finish_reason=chunk.finish_reason)
        return sse(self._body([choice]))

    async def events(self, generation: Generation) -> AsyncIterator[str]:
        try:
            async for chunk in generation.chunks():
                yield self._event(chunk)
            if self.include_usage:
                yield sse(self._body([], usage_body(generation.usage)))
        except Exception as exc:  # the status line is sent: report in-band
            yield sse(as_server_error(exc).body())
        yield SSE_DONE

    async def collect(self, generation: Generation) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "text": choice.text,
                "logprobs": self._logprobs(choice.logprobs, 0),
                "finish_reason": choice.finish_reason,
            }
            for i, choice in enumerate(await gather_choices(generation, self.n))
        ]
        return self._body(choices) | {"usage": usage_body(generation.usage)}
