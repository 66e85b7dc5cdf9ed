"""`EngineBackend`: the built-in engine behind the `ModelBackend` interface.

Renders chats with the model's template, tokenizes, streams through `AsyncEngine`, and
refuses new work (fast, with a retry hint) beyond a bounded queue instead of queueing forever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from talkloop.backends.base import (
    BackendError,
    BackendOverloadedError,
    GenerationChunk,
    GenerationRequest,
    Usage,
)
from talkloop.engine.async_engine import AsyncEngine
from talkloop.engine.config import EngineConfig
from talkloop.engine.llm_engine import LLMEngine
from talkloop.engine.loader import LoadedModel, build_engine, load_model
from talkloop.engine.outputs import RequestOutput

T = TypeVar("T")


@dataclass(frozen=True)
class AdmissionLimits:
    max_queued_requests: int = 256
    max_queued_prompt_tokens: int = 262_144

    def __post_init__(self) -> None:
        if self.max_queued_requests < 1 or self.max_queued_prompt_tokens < 1:
            raise ValueError("admission limits must be >= 1")


class EngineBackend:
    def __init__(
        self,
        loaded: LoadedModel,
        engine: LLMEngine,
        model_name: str,
        limits: AdmissionLimits | None = None,
        async_engine: AsyncEngine | None = None,
    ) -> None:
        self.loaded = loaded
        self._engine = engine
        self._async = async_engine or AsyncEngine(engine)
        self._model_name = model_name
        self._limits = limits or AdmissionLimits()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._in_flight_tokens = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    @classmethod
    def from_config(
        cls,
        config: EngineConfig,
        model_name: str | None = None,
        limits: AdmissionLimits | None = None,
    ) -> EngineBackend:
        models: list[LoadedModel] = []

        def build() -> LLMEngine:  # on the engine's own thread (see AsyncEngine)
            models.append(load_model(config))
            return build_engine(config, models[0])

        async_engine = AsyncEngine(build)
        loaded = models[0]
        name = model_name or loaded.path.stem
        return cls(loaded, async_engine.engine, name, limits, async_engine)

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def context_window(self) -> int:
        return self._engine.max_model_len

    def count_tokens(self, text: str) -> int:
        return len(self.loaded.tokenizer.encode(text, add_special_tokens=False))

    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        tokenizer = self.loaded.tokenizer
        if request.messages is not None:
            text = self.loaded.chat_template.render(
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
        stream = self._async.generate(prompt_ids, request.params, request.request_id)
        async for output in stream:
            if output.error:
                raise BackendError(f"generation failed: {output.error}")
            completion_tokens += sum(len(d.token_ids) for d in output.deltas)
            for chunk in _chunks(output, completion_tokens):
                if first and output.queue_time_s is not None:
                    chunk = dataclasses.replace(chunk, queue_time_s=output.queue_time_s)
                first = False
                yield chunk

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

    async def run_on_engine_thread(self, fn: Callable[[], T]) -> T:
        """Run other torch work (embeddings) on the engine's thread, between its steps.

        One thread for all torch work keeps one OpenMP team: a second team (a worker thread
        running torch ops) makes libgomp stop spinning and slows every decoding step.
        """
        return await asyncio.wrap_future(self._async.call(lambda _engine: fn()))

    async def is_ready(self) -> bool:
        return self._async.is_running

    def stats(self) -> Mapping[str, float]:
        engine = self._engine
        blocks = engine.block_manager
        cache = blocks.cache
        speculation: dict[str, float] = {}
        if engine.speculator.enabled:
            speculation = {
                "spec_decode_num_draft_tokens": float(engine.speculator.num_draft_tokens),
                "spec_decode_num_accepted_tokens": float(engine.speculator.num_accepted_tokens),
            }
        return speculation | {
            "num_requests_running": float(len(engine.scheduler.running)),
            "num_requests_waiting": float(len(engine.scheduler.waiting)),
            # Blocks in use by live requests (cached blocks nobody uses count as free).
            "kv_cache_usage_perc": 1.0 - blocks.num_available_blocks / blocks.num_blocks,
            "requests_in_flight": float(self._in_flight),
            "prefix_cache_queries_tokens": float(cache.num_query_tokens if cache else 0),
            "prefix_cache_hits_tokens": float(cache.num_hit_tokens if cache else 0),
            "prefix_cache_hit_rate": cache.hit_rate if cache else 0.0,
            "prefix_cache_blocks": float(cache.num_cached_blocks if cache else 0),
        }

    async def close(self) -> None:
        self._async.shutdown()


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
