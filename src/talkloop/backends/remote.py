"""`RemoteBackend`: a remote OpenAI-compatible server (vLLM, SGLang, llama.cpp, talkloop) with
several replicas behind the `ModelBackend` interface.

Requests stream over httpx (SSE). A request with a `session_id` goes to the replica that owns it
on a consistent-hash ring, so a conversation returns to the KV cache it warmed; others go to the
least busy replica. A replica that cannot be reached is marked down for a cool-down and the
request moves to the next one (only before any byte of its response arrived: a broken stream is
an error, never replayed). Wire mapping lives in `openai_wire`, replica choice in `replica_pool`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from talkloop.backends.base import (
    BackendError,
    BackendOverloadedError,
    GenerationChunk,
    GenerationRequest,
    Usage,
)
from talkloop.backends.hash_ring import DEFAULT_NUM_VNODES
from talkloop.backends.openai_wire import (
    CHAT_PATH,
    StreamParser,
    error_from_response,
    request_body,
)
from talkloop.backends.replica_pool import NoReplicaError, Replica, ReplicaPool, ReplicaState

logger = logging.getLogger(__name__)

APPROX_CHARS_PER_TOKEN = 4  # English text in a ~32-50k BPE vocabulary


def parse_replica_urls(text: str) -> tuple[str, ...]:
    """`"http://a:8000/v1, http://b:8000/v1"` -> the API base URLs, without trailing slashes."""
    urls = tuple(url.strip().rstrip("/") for url in text.split(",") if url.strip())
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"replica URL {url!r} is not an http(s) URL; expected e.g. http://host:8000/v1"
            )
    if not urls:
        raise ValueError("no replica URLs given; expected e.g. http://a:8000/v1,http://b:8000/v1")
    return urls


@dataclass(frozen=True)
class RemoteConfig:
    urls: tuple[str, ...]  # API base URLs of the replicas (what the openai SDK calls base_url)
    model: str  # the model name the remote servers serve
    served_model_name: str | None = None  # the name clients use here; None = `model`
    api_key: str | None = None
    context_window: int = 4096  # replaced by the servers' `max_model_len` when they report it
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0  # between two bytes of a response (prefill of a long prompt)
    cooldown_s: float = 5.0  # how long a replica that failed to connect is skipped
    num_vnodes: int = DEFAULT_NUM_VNODES

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("RemoteConfig.urls needs at least one replica URL")
        if not self.model:
            raise ValueError(
                "RemoteConfig.model must name the model the remote servers serve "
                "(see their /v1/models)"
            )
        for name in ("connect_timeout_s", "read_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RemoteConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.context_window < 1:
            raise ValueError(f"RemoteConfig.context_window must be >= 1, got {self.context_window}")


class _TryElsewhere(Exception):
    """This replica cannot take the request, but another may (nothing was streamed yet)."""

    def __init__(self, error: BackendError) -> None:
        super().__init__(str(error))
        self.error = error


class RemoteBackend:
    def __init__(self, config: RemoteConfig) -> None:
        self.config = config
        self.pool = ReplicaPool(config.urls, config.cooldown_s, config.num_vnodes)
        self._context_window = config.context_window
        self._http: httpx.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self._tokenize_available: bool | None = None  # None: not probed yet

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or self.config.model

    @property
    def context_window(self) -> int:
        return self._context_window

    @property
    def token_counting(self) -> str:
        """How `count_tokens` counts: "remote /tokenize" or an approximation."""
        if self._tokenize_available:
            return "remote /tokenize"
        return f"approximate ({APPROX_CHARS_PER_TOKEN} characters per token)"

    def _headers(self) -> dict[str, str]:
        key = self.config.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _client(self) -> httpx.AsyncClient:
        """One pooled client per event loop (pooled connections belong to the loop)."""
        loop = asyncio.get_running_loop()
        if self._http is None or self._http_loop is not loop:
            timeout = httpx.Timeout(
                self.config.read_timeout_s, connect=self.config.connect_timeout_s
            )
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
            self._http = httpx.AsyncClient(timeout=timeout, limits=limits, headers=self._headers())
            self._http_loop = loop
        return self._http

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        path, body = request_body(request, self.config.model)
        tried: list[str] = []
        last_error: BackendError | None = None
        while True:
            replica = self._pick(request.session_id, tried, last_error)
            tried.append(replica.url)
            self.pool.begin(replica)
            try:
                async for chunk in self._stream(replica, path, body, request):
                    yield chunk
                return
            except _TryElsewhere as retry:
                last_error = retry.error
            finally:
                self.pool.end(replica)

    def _pick(
        self, session_id: str | None, tried: list[str], last_error: BackendError | None
    ) -> Replica:
        try:
            return self.pool.pick(session_id, tried)
        except NoReplicaError as exc:
            if last_error is not None and isinstance(last_error, BackendOverloadedError):
                raise last_error from None
            raise BackendOverloadedError(str(exc), exc.retry_after_s) from None

    async def _stream(
        self, replica: Replica, path: str, body: dict[str, Any], request: GenerationRequest
    ) -> AsyncIterator[GenerationChunk]:
        headers = {"x-request-id": request.request_id}
        started = False
        try:
            async with self._client().stream(
                "POST", replica.url + path, json=body, headers=headers
            ) as response:
                started = True
                self.pool.mark_up(replica)
                if response.status_code != 200:
                    raise await self._error(replica, response)
                parser = StreamParser(chat=path == CHAT_PATH)
                async for line in response.aiter_lines():
                    for chunk in parser.feed_line(line):
                        yield chunk
                for chunk in parser.finish(self._fallback_usage(request, parser)):
                    yield chunk
        except httpx.TransportError as exc:
            self.pool.mark_down(replica)
            logger.warning("replica %s failed (%r); marked down", replica.url, exc)
            error = BackendError(f"a remote replica failed: {type(exc).__name__}")
            if not started:
                raise _TryElsewhere(error) from exc
            raise error from exc

    async def _error(self, replica: Replica, response: httpx.Response) -> Exception:
        content = await response.aread()
        error = error_from_response(response.status_code, content, response.headers)
        logger.info("replica %s answered %d: %s", replica.url, response.status_code, error)
        if response.status_code == 503 and isinstance(error, BackendError):
            return _TryElsewhere(error)  # busy or draining: another replica may take it
        return error

    def _fallback_usage(self, request: GenerationRequest, parser: StreamParser) -> Usage:
        """Usage for a server that sent none: approximated, and logged as such."""
        logger.debug("no usage from the remote server; approximating it")
        if request.messages is not None:
            text = "".join(str(m.get("content") or "") for m in request.messages)
            prompt_tokens = self._approx_tokens(text)
        elif isinstance(request.prompt, str):
            prompt_tokens = self._approx_tokens(request.prompt)
        else:
            prompt_tokens = len(request.prompt or [])
        return Usage(prompt_tokens, parser.num_deltas, 0)

    @staticmethod
    def _approx_tokens(text: str) -> int:
        return math.ceil(len(text) / APPROX_CHARS_PER_TOKEN)

    def count_tokens(self, text: str) -> int:
        """Tokens in `text`: the remote `/tokenize` (vLLM, SGLang) when it has one, else an
        approximation (`token_counting` says which). NOTE: blocking; call it off the event loop.
        """
        if self._tokenize_available is not False:
            count = self._remote_count(text)
            if count is not None:
                return count
        return self._approx_tokens(text)

    def _remote_count(self, text: str) -> int | None:
        try:
            replica = self.pool.pick(None)
        except NoReplicaError:
            return None
        root = replica.url.removesuffix("/v1")
        body = {"model": self.config.model, "prompt": text, "add_special_tokens": False}
        try:
            response = httpx.post(
                f"{root}/tokenize",
                json=body,
                headers=self._headers(),
                timeout=self.config.connect_timeout_s,
            )
        except httpx.HTTPError as exc:
            logger.info("tokenize on %s failed (%r); approximating", replica.url, exc)
            return None
        reply = response.json() if response.status_code == 200 else None
        if not isinstance(reply, dict) or not ("count" in reply or "tokens" in reply):
            self._tokenize_available = False  # no such route: stop asking
            return None
        self._tokenize_available = True
        return int(reply["count"]) if "count" in reply else len(reply["tokens"])

    async def is_ready(self) -> bool:
        """True when a replica answers `/v1/models` and lists this backend's model."""
        results = await asyncio.gather(*(self._probe(r) for r in self.pool.replicas.values()))
        return any(results)

    async def _probe(self, replica: Replica) -> bool:
        try:
            response = await self._client().get(f"{replica.url}/models")
            models = response.json()["data"] if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            self.pool.mark_down(replica)
            logger.info("replica %s is not ready (%r)", replica.url, exc)
            return False
        if models is None:
            return False
        self.pool.mark_up(replica)
        entry = _model_entry(models, self.config.model)
        if entry is None:
            names = [m.get("id") for m in models if isinstance(m, dict)]
            logger.warning(
                "replica %s does not serve %r; it serves %s", replica.url, self.config.model, names
            )
            return False
        if isinstance(entry.get("max_model_len"), int):
            self._context_window = entry["max_model_len"]
        return True

    def replica_states(self) -> list[ReplicaState]:
        return self.pool.states()

    def stats(self) -> Mapping[str, float]:
        states = self.pool.states()
        gauges: dict[str, float] = {
            "replicas_total": float(len(states)),
            "replicas_up": float(sum(s.up for s in states)),
            "requests_in_flight": float(sum(s.in_flight for s in states)),
            "requests_total": float(sum(s.num_requests for s in states)),
            "replica_failures_total": float(sum(s.num_failures for s in states)),
        }
        for index, state in enumerate(states):
            gauges[f"replica_{index}_up"] = float(state.up)
            gauges[f"replica_{index}_requests_in_flight"] = float(state.in_flight)
        return gauges

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


def _model_entry(models: list[Any], name: str) -> dict[str, Any] | None:
    for model in models:
        if isinstance(model, dict) and model.get("id") == name:
            return model
    return None
