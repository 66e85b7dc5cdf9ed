"""`Generation` bookkeeping with a scripted backend: exactly one ledger row per admitted
request whichever way it ends (the live-server metering tests do the same on the engine)."""

from __future__ import annotations

import asyncio

import pytest

from talkloop.backends.base import GenerationRequest
from talkloop.engine.errors import InvalidRequestError
from talkloop.engine.sampling_params import SamplingParams
from talkloop.server.db.models import UsageStatus
from talkloop.server.ledger import Meter, NoHooks, UsageEntry
from talkloop.server.openai_api.generation import Generation
from tests.server.fakes import FakeBackend

TEMPLATE = UsageEntry(
    "r", "t", "k", None, "fake", None, "chat.completions", 0, 0, 0, 0, UsageStatus.OK
)
REQUEST = GenerationRequest("r", SamplingParams(), messages=[{"role": "user", "content": "hi"}])


class Recorder:
    """Stands in for the UsageLedger: keeps what would be written."""

    def __init__(self) -> None:
        self.entries: list[UsageEntry] = []
        self.hooks = NoHooks()

    def record(self, entry: UsageEntry) -> None:
        self.entries.append(entry)


def _meter(recorder: Recorder) -> Meter:
    return Meter(recorder, TEMPLATE)  # type: ignore[arg-type]


def test_read_to_the_end_records_the_backend_usage_once() -> None:
    recorder, backend = Recorder(), FakeBackend()

    async def main() -> str:
        generation = await Generation.start(backend, REQUEST, _meter(recorder))
        text = "".join([chunk.text async for chunk in generation.chunks()])
        await generation.close()  # as the response's background task does
        return text

    assert asyncio.run(main()) == "Hello there!"
    [entry] = recorder.entries
    assert (entry.status, entry.prompt_tokens, entry.completion_tokens, entry.cached_tokens) == (
        "ok",
        5,
        3,
        2,
    )


def test_never_read_is_closed_and_metered_as_a_disconnect() -> None:
    recorder, backend = Recorder(), FakeBackend()

    async def main() -> None:
        generation = await Generation.start(backend, REQUEST, _meter(recorder))
        await generation.close()

    asyncio.run(main())
    assert backend.closed_streams == 1
    assert [(e.status, e.completion_tokens) for e in recorder.entries] == [
        ("client_disconnected", 1)  # the first chunk was generated before the response began
    ]


def test_refused_before_the_first_chunk_is_metered_as_rejected() -> None:
    recorder = Recorder()

    class Refusing(FakeBackend):
        async def generate(self, request: GenerationRequest):  # type: ignore[no-untyped-def,override]
            raise InvalidRequestError("max_tokens too big", "max_tokens")
            yield

    with pytest.raises(InvalidRequestError):
        asyncio.run(Generation.start(Refusing(), REQUEST, _meter(recorder)))
    assert [e.status for e in recorder.entries] == ["rejected"]
