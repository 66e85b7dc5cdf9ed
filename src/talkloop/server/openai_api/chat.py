"""`POST /v1/chat/completions`, streamed (SSE) or not, exactly in OpenAI's shapes.

Stream: the same id on every chunk; each choice first gets a delta with its role, then content
deltas, then one empty delta carrying its `finish_reason`; with `stream_options.include_usage`
a last chunk with no choices carries usage; a failure mid-stream is sent as an `error` event;
`data: [DONE]` ends every stream the client is still reading.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from talkloop.backends.base import GenerationChunk, GenerationRequest
from talkloop.characters.model import Character as CharacterCard
from talkloop.engine.outputs import TokenLogprob
from talkloop.server.auth import PrincipalDep
from talkloop.server.deps import ServicesDep
from talkloop.server.errors import BadRequestError, as_server_error
from talkloop.server.model_registry import ResolvedModel
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
from talkloop.server.openai_api.schemas import ChatCompletionRequest, ChatMessage

router = APIRouter()
ENDPOINT = "chat.completions"


@router.post("/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, principal: PrincipalDep, services: ServicesDep
) -> Response:
    call = await resolve_call(request, services, principal.acting_for(body.user), body.model)
    await character_chat.check_visible(services, call)
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = sampling.sampling_params(
        body,
        max_tokens,
        services.settings.default_max_tokens,
        sampling.chat_logprobs(body),
        sampling.structured_output(body),
    )
    token_bytes = logprobs.token_bytes_for(call.model.backend) if body.logprobs else None
    chat = ChatStream(call, body, token_bytes)
    if character_chat.wants_history(request, call):  # server-side history
        return await character_chat.respond(request, services, call, body, params, chat)
    messages = backend_messages(body, call.model)
    generation_request = GenerationRequest(call.request_id, params, messages=messages)
    meter = call.meter(services, ENDPOINT)
    generation = await Generation.start(call.model.backend, generation_request, meter)
    if body.stream:
        return sse_response(chat.events(generation), generation)
    return await respond_unless_disconnected(request, chat.collect(generation))


def message_text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise BadRequestError(
                f"content parts of type {part.type!r} are not supported; send text parts",
                param=f"messages[{index}].content",
            )
    return "".join(part.text or "" for part in message.content)


def character_system_prompt(card: CharacterCard) -> str:
    """A plain system prompt from a card (full prompt assembly with lore comes later)."""
    if card.system_prompt:
        return card.system_prompt.replace("{{char}}", card.name)
    parts = [f"You are {card.name}.", card.description, card.personality]
    if card.scenario:
        parts.append(f"Scenario: {card.scenario}")
    return "\n".join(part for part in parts if part).replace("{{char}}", card.name)


def backend_messages(body: ChatCompletionRequest, model: ResolvedModel) -> list[dict[str, str]]:
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": message_text(m, i)}
        for i, m in enumerate(body.messages)
    ]
    if model.character is not None:
        messages.insert(0, {"role": "system", "content": character_system_prompt(model.character)})
    return messages


def _text_choice(index: Any, text: str) -> dict[str, Any]:
    return {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}


class ChatStream:
    """Turns one generation's chunks into chat completion chunks or one response."""

    def __init__(
        self,
        call: Call,
        body: ChatCompletionRequest,
        token_bytes: logprobs.TokenBytes | None,
    ) -> None:
        self.call = call
        self.id = f"chatcmpl-{call.request_id}"
        self.n = body.n
        self.include_usage = bool(
            body.stream and body.stream_options and body.stream_options.include_usage
        )
        self.token_bytes = token_bytes
        self._text_event = TextEvent(self._chunk, _text_choice)

    def _chunk(
        self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.call.created,
            "model": self.call.model.name,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage
        return chunk

    def _logprobs(self, items: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
        if self.token_bytes is None:
            return None
        return logprobs.chat_logprobs(items or (), self.token_bytes)

    def _events(self, chunk: GenerationChunk) -> list[str]:
        """A chunk's SSE events: its text (from the template when it has no logprobs: most
        tokens), then its finish reason."""
        events = []
        if chunk.text or chunk.logprobs:
            lp = self._logprobs(chunk.logprobs)
            if lp is None:
                events.append(self._text_event(chunk.index, chunk.text))
            else:
                choice = _text_choice(chunk.index, chunk.text)
                choice["logprobs"] = lp
                events.append(sse(self._chunk([choice])))
        if chunk.finish_reason:
            finish = {
                "index": chunk.index,
                "delta": {},
                "logprobs": None,
                "finish_reason": chunk.finish_reason,
            }
            events.append(sse(self._chunk([finish])))
        return events

    async def events(self, generation: Generation) -> AsyncIterator[str]:
        for index in range(self.n):
            role = {"role": "assistant", "content": ""}
            yield sse(
                self._chunk(
                    [{"index": index, "delta": role, "logprobs": None, "finish_reason": None}]
                )
            )
        try:
            async for chunk in generation.chunks():
                for event in self._events(chunk):
                    yield event
            if self.include_usage:
                yield sse(self._chunk([], usage_body(generation.usage)))
        except Exception as exc:  # the status line is sent: report in-band
            yield sse(as_server_error(exc).body())
        yield SSE_DONE

    async def collect(self, generation: Generation) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": choice.text, "refusal": None},
                "logprobs": self._logprobs(choice.logprobs),
                "finish_reason": choice.finish_reason,
            }
            for i, choice in enumerate(await gather_choices(generation, self.n))
        ]
        body = self._chunk(choices) | {
            "object": "chat.completion",
            "usage": usage_body(generation.usage),
        }
        return body
