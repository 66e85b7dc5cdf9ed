"""`EngineBackend`: the built-in engine behind the `ModelBackend` interface.

Renders chats with the model's template, tokenizes, streams through the engine (`AsyncEngine`
on a thread here, or `EngineProcess` in a child process, which `talkloop serve` uses), and
refuses new work (fast, with a retry hint) beyond a bounded queue instead of queueing forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from talkloop.backends.base import (
    BackendError,
    BackendOverloadedError,
    GenerationChunk,
    GenerationRequest,
    Usage,
)
from talkloop.engine.async_engine import AsyncEngine
from talkloop.engine.chat_template import ChatTemplate
from talkloop.engine.config import EngineConfig
from talkloop.engine.engine_process import EngineProcess
from talkloop.engine.errors import EngineDeadError
from talkloop.engine.llm_engine import LLMEngine
from talkloop.engine.loader import (
    LoadedModel,
    build_engine,
    load_model,
    load_tokenizer,
    model_path,
)
from talkloop.engine.outputs import RequestOutput
from talkloop.engine.sampling_params import SamplingParams
from talkloop.engine.tokenizer import Tokenizer

T = TypeVar("T")


@dataclass(frozen=True)
class AdmissionLimits:
    max_queued_requests: int = 256
    max_queued_prompt_tokens: int = 262_144

    def __post_init__(self) -> None:
        if self.max_queued_requests < 1 or self.max_queued_prompt_tokens < 1:
            raise ValueError("admission limits must be >= 1")


class EngineClient(Protocol):
    """How the backend drives an engine: `AsyncEngine` (a thread of this process) or
    `EngineProcess` (a child process)."""

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]: ...

    @property
    def is_running(self) -> bool: ...

    @property
    def max_model_len(self) -> int: ...

    def stats(self) -> dict[str, float]: ...

    def shutdown(self, timeout_s: float = 5.0) -> None: ...


class EngineBackend:
    """`loaded` is the model when the engine runs in this process (None in a child process)."""

    def __init__(
        self,
        client: EngineClient,
        tokenizer: Tokenizer,
        model_name: str,
        limits: AdmissionLimits | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        self._client = client
        self.tokenizer = tokenizer
        self.chat_template = (
            loaded.chat_template if loaded is not None else ChatTemplate.for_tokenizer(tokenizer)
        )
        self.loaded = loaded
        self._model_name = model_name
        self._limits = limits or AdmissionLimits()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._in_flight_tokens = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._torch_pool: ThreadPoolExecutor | None = None

    @classmethod
    def from_config(
        cls,
        config: EngineConfig,
        model_name: str | None = None,
        limits: AdmissionLimits | None = None,
        *,
        process: bool = False,
        process_setup: Callable[[], None] | None = None,
    ) -> EngineBackend:
        """Load `config.model` and start its engine: on a thread of this process, or with
        `process` in a child process (`process_setup` runs first there: logging, say)."""
        name = model_name or model_path(config).stem
        if process:
            tokenizer = load_tokenizer(config)
            return cls(EngineProcess(config, process_setup), tokenizer, name, limits)
        models: list[LoadedModel] = []

        def build() -> LLMEngine:  # on the engine's own thread (see AsyncEngine)
            models.append(load_model(config))
            return build_engine(config, models[0])

        client = AsyncEngine(build)
        return cls(client, models[0].tokenizer, name, limits, models[0])

    @classmethod
    def from_engine(
        cls,
        loaded: LoadedModel,
        engine: LLMEngine,
        model_name: str,
        limits: AdmissionLimits | None = None,
    ) -> EngineBackend:
        """An engine already built here, stepped by a thread of this process."""
        return cls(AsyncEngine(engine), loaded.tokenizer, model_name, limits, loaded)

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def context_window(self) -> int:
        return self._client.max_model_len

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        tokenizer = self.tokenizer
        if request.messages is not None:
            text = self.chat_template.render(
                request.messages,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
            )
            return tokenizer.encode(text, add_special_tokens=False)
        if isinstance(request.prompt, str):
            return tokenizer.encode(request.prompt)
        return list(request.prompt or [])

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        prompt_ids = self.prompt_token_ids(request)
        self._admit(len(prompt_ids))
        try:
            async for chunk in self._stream(request, prompt_ids):
                yield chunk
        finally:
            self._release(len(prompt_ids))

    async def _stream(
        self, request: GenerationRequest, prompt_ids: list[int]
    ) -> AsyncIterator[GenerationChunk]:
        completion_tokens = 0
        first = True
        stream = self._client.generate(prompt_ids, request.params, request.request_id)
        async with contextlib.aclosing(stream):  # an early exit aborts the request now
            try:
                async for output in stream:
                    if output.error:
                        raise BackendError(f"generation failed: {output.error}")
                    completion_tokens += sum(len(d.token_ids) for d in output.deltas)
                    for chunk in _chunks(output, completion_tokens):
                        if first and output.queue_time_s is not None:
                            chunk = dataclasses.replace(chunk, queue_time_s=output.queue_time_s)
                        first = False
                        yield chunk
            except EngineDeadError as exc:  # the server's 5xx, as any backend failure
                raise BackendError(str(exc)) from exc

    def _admit(self, num_tokens: int) -> None:
        with self._lock:
            limits = self._limits
            if (
                self._in_flight >= limits.max_queued_requests
                or self._in_flight_tokens + num_tokens > limits.max_queued_prompt_tokens
            ):
                raise BackendOverloadedError(
                    f"the model is at capacity ({self._in_flight} requests in flight); "
                    "retry shortly",
                    retry_after_s=1.0,
                )
            self._in_flight += 1
            self._in_flight_tokens += num_tokens
            self.prompt_tokens_total += num_tokens

    def _release(self, num_tokens: int) -> None:
        with self._lock:
            self._in_flight -= 1
            self._in_flight_tokens -= num_tokens

    async def run_torch(self, fn: Callable[[], T]) -> T:
        """Run other torch work (embeddings) where it does not fight the engine for cores.

        With the engine on a thread here: on that thread, between its steps. One thread for
        all torch work keeps one OpenMP team: a second team (a worker thread running torch ops)
        makes libgomp stop spinning and slows every decoding step. With the engine in a child
        process: on one worker thread here, with one torch thread.
        """
        if isinstance(self._client, AsyncEngine):
            return await asyncio.wrap_future(self._client.call(lambda _engine: fn()))
        if self._torch_pool is None:
            self._torch_pool = ThreadPoolExecutor(
                1, "talkloop-torch", initializer=torch.set_num_threads, initargs=(1,)
            )
        return await asyncio.get_running_loop().run_in_executor(self._torch_pool, fn)

    async def is_ready(self) -> bool:
        return self._client.is_running

    def stats(self) -> Mapping[str, float]:
        return self._client.stats() | {"requests_in_flight": float(self._in_flight)}

    async def close(self) -> None:
        await asyncio.to_thread(self._client.shutdown)
        if self._torch_pool is not None:
            self._torch_pool.shutdown(wait=False)


def _chunks(output: RequestOutput, completion_tokens: int) -> list[GenerationChunk]:
    chunks = [
        GenerationChunk(d.index, d.text, d.token_ids, d.logprobs, d.finish_reason)
        for d in output.deltas
        if d.text or d.token_ids or d.finish_reason
    ]
    if output.finished:
        usage = Usage(output.num_prompt_tokens, completion_tokens, output.num_cached_tokens)
        last = chunks[-1] if chunks else GenerationChunk(0, "")
        chunks[-1:] = [GenerationChunk(**{**last.__dict__, "usage": usage})]
    return chunks
