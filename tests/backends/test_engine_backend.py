"""EngineBackend on the bundled model: chat streaming, usage, admission limits."""

from __future__ import annotations

import asyncio

import pytest

from talkloop.backends.base import BackendOverloadedError, GenerationRequest
from talkloop.backends.engine_backend import AdmissionLimits, EngineBackend
from talkloop.engine.config import EngineConfig
from talkloop.engine.errors import InvalidRequestError
from talkloop.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def backend() -> EngineBackend:
    b = EngineBackend.from_config(
        EngineConfig(dtype="bfloat16"), "smollm2", AdmissionLimits(max_queued_requests=2)
    )
    yield b
    asyncio.run(b.close())


def _chat(text: str, **params: object) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"t-{text[:8]}-{id(params)}",
        params=SamplingParams(temperature=0.0, **params),  # type: ignore[arg-type]
        messages=[{"role": "user", "content": text}],
    )


async def _collect(backend: EngineBackend, request: GenerationRequest) -> tuple[str, object]:
    text, usage = "", None
    async for chunk in backend.generate(request):
        text += chunk.text
        usage = chunk.usage or usage
    return text, usage


def test_chat_streams_and_reports_usage(backend: EngineBackend) -> None:
    text, usage = asyncio.run(
        _collect(backend, _chat("What is the capital of France?", max_tokens=24))
    )
    assert "Paris" in text
    prompt_len = len(backend.prompt_token_ids(_chat("What is the capital of France?")))
    assert usage.prompt_tokens == prompt_len  # type: ignore[attr-defined]
    assert 0 < usage.completion_tokens <= 24  # type: ignore[attr-defined]


def test_bad_request_raises_before_streaming(backend: EngineBackend) -> None:
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        asyncio.run(_collect(backend, _chat("hi", max_tokens=100_000)))
    assert backend.stats()["requests_in_flight"] == 0


def test_admission_refuses_fast_beyond_the_queue(backend: EngineBackend) -> None:
    async def main() -> list[object]:
        tasks = [
            asyncio.create_task(_collect(backend, _chat(f"Count to {i}", max_tokens=16)))
            for i in range(4)
        ]
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, BackendOverloadedError)]
    assert len(refused) == 2 and all(r.retry_after_s > 0 for r in refused)
    assert backend.stats()["requests_in_flight"] == 0
