"""A scripted `ModelBackend` for fast unit tests (always beside a test on the real engine)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from talkloop.backends.base import (
    BackendError,
    GenerationChunk,
    GenerationRequest,
    Usage,
)


class FakeBackend:
    """Streams `words` one per chunk; `fail_after` raises a BackendError after that many."""

    def __init__(
        self,
        model_name: str = "fake",
        words: tuple[str, ...] = ("Hello", " there", "!"),
        fail_after: int | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self._model_name = model_name
        self.words = words
        self.fail_after = fail_after
        self.delay_s = delay_s
        self.requests: list[GenerationRequest] = []
        self.closed_streams = 0

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def context_window(self) -> int:
        return 2048

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.requests.append(request)
        try:
            for i, word in enumerate(self.words):
                if self.fail_after is not None and i == self.fail_after:
                    raise BackendError("the fake backend broke")
                await asyncio.sleep(self.delay_s)
                last = i == len(self.words) - 1
                yield GenerationChunk(
                    0,
                    word,
                    (i,),
                    finish_reason="stop" if last else None,
                    usage=Usage(5, len(self.words), 2) if last else None,
                )
        finally:
            self.closed_streams += 1

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def is_ready(self) -> bool:
        return True

    def stats(self) -> Mapping[str, float]:
        return {}

    async def close(self) -> None:
        return None
