"""RemoteBackend against two real talkloop servers on loopback (the bundled model): streamed
text and usage as the server gives them, session affinity, failover and recovery, error mapping,
and selection by the server's settings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from talkloop.backends.base import (
    BackendError,
    BackendOverloadedError,
    GenerationRequest,
    Usage,
)
from talkloop.backends.hash_ring import HashRing
from talkloop.backends.remote import RemoteBackend, RemoteConfig, parse_replica_urls
from talkloop.engine.errors import InvalidRequestError
from talkloop.engine.sampling_params import SamplingParams
from talkloop.server import Settings
from talkloop.server.app import build_backend
from tests.backends.conftest import ADMIN_KEY, MODEL, TINY_MODEL, ReplicaServer

pytestmark = pytest.mark.integration

QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]
QUESTION_TEXT = "What is the capital of France?"


def _backend(replicas: list[ReplicaServer], model: str = MODEL, **kw: object) -> RemoteBackend:
    urls = tuple(r.url for r in replicas)
    return RemoteBackend(RemoteConfig(urls, model, api_key=ADMIN_KEY, **kw))


def _chat(
    text: str, session_id: str | None = None, max_tokens: int = 12, **params: object
) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"r-{time.monotonic_ns()}",
        params=SamplingParams(temperature=0.0, max_tokens=max_tokens, **params),
        messages=[{"role": "user", "content": text}],
        session_id=session_id,
    )


async def _collect(backend: RemoteBackend, request: GenerationRequest) -> tuple[str, Usage]:
    text, usage = "", None
    async for chunk in backend.generate(request):
        text += chunk.text
        usage = chunk.usage or usage
    assert usage is not None
    return text, usage


def _run(backend: RemoteBackend, request: GenerationRequest) -> tuple[str, Usage]:
    async def main() -> tuple[str, Usage]:
        try:
            return await _collect(backend, request)
        finally:
            await backend.close()

    return asyncio.run(main())


def _session_owned_by(replicas: list[ReplicaServer], index: int, prefix: str) -> str:
    ring = HashRing([r.url for r in replicas])
    return next(
        f"{prefix}-{i}"
        for i in range(1000)
        if ring.node_for(f"{prefix}-{i}") == replicas[index].url
    )


def test_streamed_chat_equals_the_servers_own_reply_with_its_usage(
    replicas: list[ReplicaServer],
) -> None:
    direct = openai.OpenAI(api_key=ADMIN_KEY, base_url=replicas[0].url, max_retries=0)
    reply = direct.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
    )
    text, usage = _run(_backend(replicas[:1]), _chat(QUESTION_TEXT))
    assert text == reply.choices[0].message.content
    again = direct.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
    ).usage
    assert again is not None and again.prompt_tokens_details is not None
    cached = again.prompt_tokens_details.cached_tokens  # the first reply warmed the prefix cache
    assert cached
    assert usage == Usage(again.prompt_tokens, again.completion_tokens, cached)


def test_streamed_completion_of_a_text_prompt_equals_the_servers_reply(
    replicas: list[ReplicaServer],
) -> None:
    direct = openai.OpenAI(api_key=ADMIN_KEY, base_url=replicas[1].url, max_retries=0)
    prompt = "The three primary colours are"
    reply = direct.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    request = GenerationRequest(
        "c-1", SamplingParams(temperature=0.0, max_tokens=10), prompt=prompt
    )
    text, usage = _run(_backend(replicas[1:]), request)
    assert text == reply.choices[0].text
    assert reply.usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )


def test_a_conversation_stays_on_the_replica_that_owns_its_session(
    replicas: list[ReplicaServer],
) -> None:
    sessions = [_session_owned_by(replicas, 0, "alice"), _session_owned_by(replicas, 1, "bob")]
    before = [r.num_metered() for r in replicas]
    backend = _backend(replicas)

    async def conversation(session: str) -> None:
        history = "Hi."
        for _ in range(3):
            text, _ = await _collect(backend, _chat(history, session, max_tokens=4))
            history += f" {text} Tell me more."

    async def main() -> None:
        await asyncio.gather(*(conversation(s) for s in sessions))
        await backend.close()

    asyncio.run(main())
    after = [r.num_metered() for r in replicas]
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 3]
    assert [s.num_requests for s in backend.replica_states()] == [3, 3]
    # Three turns of alice alone: all on replica 0.
    backend = _backend(replicas)

    async def alice() -> None:
        for turn in range(3):
            await _collect(backend, _chat(f"turn {turn}", sessions[0], max_tokens=2))
        await backend.close()

    asyncio.run(alice())
    assert [s.num_requests for s in backend.replica_states()] == [3, 0]


def test_requests_without_a_session_spread_over_the_replicas(
    replicas: list[ReplicaServer],
) -> None:
    before = [r.num_metered() for r in replicas]
    backend = _backend(replicas)

    async def main() -> None:
        await asyncio.gather(*(_collect(backend, _chat(f"Count to {i}")) for i in range(4)))
        await backend.close()

    asyncio.run(main())
    after = [r.num_metered() for r in replicas]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 2]


@pytest.fixture
def stoppable(replicas: list[ReplicaServer]) -> Iterator[list[ReplicaServer]]:
    yield replicas
    if not replicas[1].app or replicas[1]._thread is None or not replicas[1]._thread.is_alive():
        replicas[1].start()


def test_a_dead_replicas_sessions_move_to_the_next_and_come_back_after_the_cooldown(
    stoppable: list[ReplicaServer],
) -> None:
    replicas = stoppable
    session = _session_owned_by(replicas, 1, "carol")
    backend = _backend(replicas, cooldown_s=1.5)

    async def turn() -> str:
        text, _ = await _collect(backend, _chat("Hello!", session, max_tokens=2))
        return text

    async def main() -> None:
        await turn()
        replicas[1].stop()
        served_by_a = replicas[0].num_metered()
        await turn()  # B refuses the connection: marked down, A serves it
        assert replicas[0].num_metered() == served_by_a + 1
        assert backend.stats()["replicas_up"] == 1.0
        assert backend.stats()["replica_failures_total"] == 1.0
        await turn()  # B is skipped during the cool-down (no second failure)
        assert backend.stats()["replica_failures_total"] == 1.0
        replicas[1].start()
        await asyncio.sleep(1.5)
        served_by_b = replicas[1].num_metered()
        await turn()  # tried again after the cool-down: the session is home
        assert replicas[1].num_metered() == served_by_b + 1
        assert backend.stats()["replicas_up"] == 2.0
        await backend.close()

    asyncio.run(main())
    assert [s.num_requests for s in backend.replica_states()] == [2, 3]  # 1 failed try on B


def test_no_reachable_replica_is_a_retryable_overload() -> None:
    config = RemoteConfig(("http://127.0.0.1:9/v1", "http://127.0.0.1:7/v1"), MODEL)
    backend = RemoteBackend(config)
    with pytest.raises(BackendOverloadedError, match=r"\(2 of 2 down, 2 tried\)") as caught:
        _run(backend, _chat("hi"))
    assert caught.value.retry_after_s >= 1.0
    assert backend.stats()["replicas_up"] == 0.0


def test_a_bad_request_maps_to_invalid_request_with_the_remote_param(
    replicas: list[ReplicaServer],
) -> None:
    with pytest.raises(InvalidRequestError, match="max_tokens") as caught:
        _run(_backend(replicas), _chat("hi", max_tokens=100_000))
    assert caught.value.param == "max_tokens"


def test_an_overloaded_model_maps_to_overloaded_with_retry_after(
    replicas: list[ReplicaServer],
) -> None:
    backend = _backend(replicas, model=TINY_MODEL)

    async def main() -> list[tuple[str, Usage] | BaseException]:
        tasks = [_collect(backend, _chat(f"Count to {i}", max_tokens=32)) for i in range(4)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await backend.close()
        return results

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, BackendOverloadedError)]
    served = [r for r in results if isinstance(r, tuple)]
    # Both replicas front the same one-at-a-time engine: one request is served; each other one
    # is refused by its replica (503), tried on the other one, refused again.
    assert len(served) == 1 and len(refused) == 3
    assert all(r.retry_after_s == 1.0 and "busy (503)" in str(r) for r in refused)
    assert sum(s.num_requests for s in backend.replica_states()) == 1 + 3 * 2
    assert backend.stats()["replicas_up"] == 2.0  # busy is not down


def test_other_remote_errors_map_to_backend_error(replicas: list[ReplicaServer]) -> None:
    wrong_key = RemoteBackend(RemoteConfig((replicas[0].url,), MODEL, api_key="nope"))
    with pytest.raises(BackendError, match="answered 401") as caught:
        _run(wrong_key, _chat("hi"))
    assert not isinstance(caught.value, BackendOverloadedError)
    with pytest.raises(BackendError, match="answered 404: the model 'no-such-model'"):
        _run(_backend(replicas, model="no-such-model"), _chat("hi"))


def test_readiness_token_counting_and_names(replicas: list[ReplicaServer]) -> None:
    backend = _backend(replicas, served_model_name="remote-smollm2")
    assert backend.model_name == "remote-smollm2"
    assert asyncio.run(backend.is_ready()) is True
    assert not asyncio.run(_backend(replicas, model="absent").is_ready())
    # talkloop has no /tokenize: an approximation, said so.
    assert backend.count_tokens("twelve chars") == 3
    assert backend.token_counting == "approximate (4 characters per token)"


def test_the_server_serves_a_remote_backend_named_in_its_settings(
    replicas: list[ReplicaServer], tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("front"),
        admin_key=ADMIN_KEY,
        backend_urls=f"{replicas[0].url}, {replicas[1].url}/",
        backend_model=MODEL,
        backend_api_key=ADMIN_KEY,
        served_model_name="via-remote",
        load_bundled_characters=False,
    )
    backend = build_backend(settings)
    assert isinstance(backend, RemoteBackend)
    assert backend.config.urls == (replicas[0].url, replicas[1].url)
    front = ReplicaServer(settings, []).start()  # builds (and owns) its remote backend
    try:
        client = openai.OpenAI(api_key=ADMIN_KEY, base_url=front.url, max_retries=0)
        reply = client.chat.completions.create(
            model="via-remote",
            messages=QUESTION,
            max_tokens=12,
            temperature=0,
        )
    finally:
        front.stop()
    direct = openai.OpenAI(api_key=ADMIN_KEY, base_url=replicas[0].url, max_retries=0)
    expected = direct.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
    )
    assert reply.model == "via-remote"
    assert reply.choices[0].message.content == expected.choices[0].message.content


def test_settings_that_name_urls_without_a_model_are_refused() -> None:
    with pytest.raises(ValueError, match="backend_model must name the remote model"):
        build_backend(Settings(backend_urls="http://a:8000/v1", dev_mode=True))
    with pytest.raises(ValueError, match="is not an http"):
        parse_replica_urls("a:8000/v1")
