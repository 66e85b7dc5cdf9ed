"""The OpenAI wire format as a remote backend speaks it: request bodies, SSE chunks, errors.

`request_body` maps a `GenerationRequest` onto `/v1/chat/completions` (messages) or
`/v1/completions` (prompt), with vLLM's extra fields only where they differ from the default
(so strict servers see only OpenAI's fields). `StreamParser` turns SSE lines into
`GenerationChunk`s. `error_from_response` maps an HTTP error onto the backend error hierarchy.
No I/O here.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from talkloop.backends.base import (
    BackendError,
    BackendOverloadedError,
    GenerationChunk,
    GenerationRequest,
    Usage,
)
from talkloop.engine.errors import InvalidRequestError
from talkloop.engine.outputs import TokenLogprob
from talkloop.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

CHAT_PATH = "/chat/completions"
COMPLETIONS_PATH = "/completions"
TOKEN_ID_PREFIX = "token_id:"  # vLLM's spelling of tokens with `return_tokens_as_token_ids`
DEFAULT_RETRY_AFTER_S = 1.0
MAX_ERROR_CHARS = 500


def request_body(request: GenerationRequest, model: str) -> tuple[str, dict[str, Any]]:
    """(path under the API base URL, JSON body) of a streamed request with usage."""
    params = request.params
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        **_openai_fields(params),
        **_vllm_fields(params),
        **_structured_fields(params),
    }
    if request.messages is None:
        prompt = request.prompt
        body["prompt"] = prompt if isinstance(prompt, str) else list(prompt or [])
        if params.logprobs is not None:
            body["logprobs"] = params.logprobs
        return COMPLETIONS_PATH, body
    body["messages"] = [dict(message) for message in request.messages]
    if params.logprobs is not None:
        body["logprobs"] = True
        body["top_logprobs"] = params.logprobs
    if not request.add_generation_prompt:
        body["add_generation_prompt"] = False
    if request.continue_final_message:
        body["continue_final_message"] = True
    return CHAT_PATH, body


def _openai_fields(params: SamplingParams) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "n": params.n,
    }
    if params.presence_penalty:
        fields["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        fields["frequency_penalty"] = params.frequency_penalty
    if params.seed is not None:
        fields["seed"] = params.seed
    if params.stop:
        fields["stop"] = list(params.stop)
    if params.logit_bias:
        fields["logit_bias"] = {str(token_id): bias for token_id, bias in params.logit_bias.items()}
    return fields


def _vllm_fields(params: SamplingParams) -> dict[str, Any]:
    """Fields OpenAI lacks but vLLM (and talkloop, SGLang) accept; sent only when not default."""
    candidates: dict[str, tuple[Any, Any]] = {  # name: (value, default)
        "top_k": (params.top_k, 0),
        "min_p": (params.min_p, 0.0),
        "repetition_penalty": (params.repetition_penalty, 1.0),
        "ignore_eos": (params.ignore_eos, False),
        "stop_token_ids": (list(params.stop_token_ids), []),
        "include_stop_str_in_output": (params.include_stop_str_in_output, False),
        "skip_special_tokens": (params.skip_special_tokens, True),
        "return_tokens_as_token_ids": (params.logprobs is not None, False),
    }
    return {name: value for name, (value, default) in candidates.items() if value != default}


def _structured_fields(params: SamplingParams) -> dict[str, Any]:
    # NOTE: read with getattr so this module works with and without constrained decoding.
    structured = getattr(params, "structured", None)
    if structured is None:
        return {}
    if structured.kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    if structured.kind == "json_schema":
        schema = {"name": "output", "schema": dict(structured.json_schema or {})}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    raise InvalidRequestError(
        f"response_format of kind {structured.kind!r} cannot be forwarded to a remote server; "
        "use json_object or json_schema",
        param="response_format",
    )


def usage_from(raw: Mapping[str, Any]) -> Usage:
    details = raw.get("prompt_tokens_details") or {}
    return Usage(
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        completion_tokens=int(raw.get("completion_tokens") or 0),
        cached_tokens=int(details.get("cached_tokens") or 0),
    )


class StreamParser:
    """SSE lines of one streamed response -> chunks, usage riding on the last one.

    Servers send usage in a chunk after every choice finished, so the latest finishing chunk is
    held back (never a text chunk, so no text is delayed) and carries the usage when it comes.
    """

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.usage: Usage | None = None
        self.num_deltas = 0  # text deltas seen (about one per token on vLLM and talkloop)
        self.done = False
        self._held: GenerationChunk | None = None

    def feed_line(self, line: str) -> list[GenerationChunk]:
        if not line.startswith("data:") or self.done:
            return []  # blank separators, `event:` names, `:` keep-alive comments
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            self.done = True
            return []
        event = json.loads(data)
        if "error" in event or event.get("object") == "error":
            raise stream_error(event)
        if event.get("usage"):
            self.usage = usage_from(event["usage"])
        return self._chunks(event.get("choices") or [])

    def _chunks(self, choices: list[dict[str, Any]]) -> list[GenerationChunk]:
        out: list[GenerationChunk] = []
        for choice in choices:
            chunk = self._chunk(choice)
            if chunk.text or chunk.logprobs:
                self.num_deltas += 1
            if chunk.finish_reason is not None:
                out += self._release()
                self._held = chunk
            elif chunk.text or chunk.logprobs:
                out.append(chunk)
        return out

    def _chunk(self, choice: dict[str, Any]) -> GenerationChunk:
        if self.chat:
            text = (choice.get("delta") or {}).get("content") or ""
            items = chat_logprobs(choice.get("logprobs"))
        else:
            text = choice.get("text") or ""
            items = completion_logprobs(choice.get("logprobs"))
        token_ids = tuple(item.token_id for item in items) if items else ()
        return GenerationChunk(
            int(choice.get("index") or 0), text, token_ids, items, choice.get("finish_reason")
        )

    def _release(self) -> list[GenerationChunk]:
        held, self._held = self._held, None
        return [held] if held is not None else []

    def finish(self, fallback: Usage) -> list[GenerationChunk]:
        """The held chunk with the usage (`fallback` when the server sent none)."""
        usage = self.usage or fallback
        last = self._held or GenerationChunk(0, "")
        self._held = None
        return [GenerationChunk(**{**last.__dict__, "usage": usage})]


def _token_id(token: str) -> int | None:
    if token.startswith(TOKEN_ID_PREFIX):
        try:
            return int(token[len(TOKEN_ID_PREFIX) :])
        except ValueError:
            return None
    return None


def chat_logprobs(raw: Mapping[str, Any] | None) -> tuple[TokenLogprob, ...] | None:
    """Chat `logprobs.content`, or None when the server did not spell tokens as ids."""
    if not raw or not raw.get("content"):
        return None
    items = []
    for entry in raw["content"]:
        token_id = _token_id(entry.get("token", ""))
        top = [
            (_token_id(t.get("token", "")), t.get("logprob"))
            for t in entry.get("top_logprobs") or []
        ]
        if token_id is None or any(tid is None for tid, _ in top):
            return None
        items.append(TokenLogprob(token_id, float(entry["logprob"]), tuple(top)))  # type: ignore[arg-type]
    return tuple(items)


def completion_logprobs(raw: Mapping[str, Any] | None) -> tuple[TokenLogprob, ...] | None:
    """Legacy `logprobs` (tokens, token_logprobs, top_logprobs), or None without token ids."""
    if not raw or not raw.get("tokens"):
        return None
    tops = raw.get("top_logprobs") or [None] * len(raw["tokens"])
    items = []
    for token, logprob, top in zip(raw["tokens"], raw["token_logprobs"], tops, strict=True):
        pairs = [(_token_id(t), lp) for t, lp in (top or {}).items()]
        token_id = _token_id(token)
        if token_id is None or any(tid is None for tid, _ in pairs):
            return None
        ranked = tuple(sorted(pairs, key=lambda pair: -pair[1]))
        items.append(TokenLogprob(token_id, float(logprob), ranked))  # type: ignore[arg-type]
    return tuple(items)


def _error_fields(content: bytes) -> tuple[str, str | None]:
    """(message, param) from an OpenAI, vLLM or FastAPI error body, or its text."""
    try:
        body = json.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace")[:MAX_ERROR_CHARS] or "(empty body)", None
    if not isinstance(body, dict):
        return str(body)[:MAX_ERROR_CHARS], None
    nested = body.get("error")
    error: dict[str, Any] = nested if isinstance(nested, dict) else body
    message = error.get("message") or error.get("detail") or nested or body
    param = error.get("param")
    return str(message)[:MAX_ERROR_CHARS], str(param) if param else None


def stream_error(event: Mapping[str, Any]) -> BackendError:
    message, _ = _error_fields(json.dumps(event).encode())
    return BackendError(f"the remote server failed mid-stream: {message}")


def retry_after_s(value: str | None) -> float:
    """Seconds from a `Retry-After` header (seconds or an HTTP date)."""
    if not value:
        return DEFAULT_RETRY_AFTER_S
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER_S
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else DEFAULT_RETRY_AFTER_S


def error_from_response(
    status: int, content: bytes, headers: Mapping[str, str]
) -> BackendError | InvalidRequestError:
    """400/422 -> InvalidRequestError (with the remote's param); 429/503 -> overloaded."""
    message, param = _error_fields(content)
    if status in (400, 422):
        return InvalidRequestError(message, param=param)
    if status in (429, 503):
        return BackendOverloadedError(
            f"the remote server is busy ({status}): {message}",
            retry_after_s=retry_after_s(headers.get("retry-after")),
        )
    return BackendError(f"the remote server answered {status}: {message}")
