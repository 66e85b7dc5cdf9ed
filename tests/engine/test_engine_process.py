"""`EngineProcess`: the engine in a child process, against the same engine on a thread here.

On the bundled model (a child process cannot be handed an in-memory tiny model). The child's
death, its stop and its parent's death are each checked on a process of their own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from talkloop.engine.async_engine import AsyncEngine
from talkloop.engine.config import EngineConfig
from talkloop.engine.engine_process import EngineProcess, engine_cpus
from talkloop.engine.errors import EngineDeadError, InvalidRequestError, ModelLoadError
from talkloop.engine.loader import build_engine, load_tokenizer
from talkloop.engine.outputs import RequestOutput
from talkloop.engine.sampling_params import SamplingParams

CONFIG = EngineConfig(dtype="bfloat16", num_threads=1)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine() -> Iterator[EngineProcess]:
    process = EngineProcess(CONFIG)
    yield process
    process.shutdown()


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return load_tokenizer(CONFIG).encode("The harbour master looked at the sea and said")


async def _collect(outputs: AsyncIterator[RequestOutput]) -> tuple[str, list[int], str | None]:
    text, tokens, reason = "", [], None
    async for output in outputs:
        for delta in output.deltas:
            text += delta.text
            tokens += delta.token_ids
            reason = delta.finish_reason or reason
    return text, tokens, reason


def _wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_streams_what_the_same_engine_on_a_thread_streams(
    engine: EngineProcess, prompt: list[int]
) -> None:
    here = AsyncEngine(build_engine(CONFIG))
    try:
        expected = asyncio.run(_collect(here.generate(prompt, GREEDY)))
    finally:
        here.shutdown()
    got = asyncio.run(_collect(engine.generate(prompt, GREEDY)))
    assert got == expected
    assert got[2] == "length" and len(got[1]) == 12


def test_concurrent_requests_each_get_their_own_stream(
    engine: EngineProcess, prompt: list[int]
) -> None:
    async def both() -> list[tuple[str, list[int], str | None]]:
        short = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
        return list(
            await asyncio.gather(
                _collect(engine.generate(prompt, GREEDY, "long")),
                _collect(engine.generate(prompt, short, "short")),
            )
        )

    long, short = asyncio.run(both())
    assert len(long[1]) == 12 and len(short[1]) == 5
    assert long[1][:5] == short[1]  # greedy: the same first tokens


def test_a_bad_request_raises_before_any_output_and_names_the_field(
    engine: EngineProcess,
) -> None:
    too_long = SamplingParams(max_tokens=engine.max_model_len)
    with pytest.raises(InvalidRequestError, match="max_tokens") as raised:
        asyncio.run(_collect(engine.generate([1, 2, 3], too_long)))
    assert raised.value.param == "max_tokens"  # survives the trip between processes
    assert engine.is_running


def test_closing_a_stream_aborts_the_request_in_the_child(
    engine: EngineProcess, prompt: list[int]
) -> None:
    async def read_two_then_close() -> None:
        params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        stream = engine.generate(prompt, params)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                break
        await stream.aclose()

    asyncio.run(read_two_then_close())
    assert _wait_until(lambda: engine.stats()["num_requests_running"] == 0)
    assert engine.stats()["kv_cache_usage_perc"] == 0.0  # its blocks were freed


def test_stats_come_from_the_child(engine: EngineProcess, prompt: list[int]) -> None:
    asyncio.run(_collect(engine.generate(prompt, GREEDY)))
    stats = engine.stats()
    assert stats["prefix_cache_queries_tokens"] > 0
    assert {"num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"} <= set(stats)


def test_sigterm_does_not_stop_the_child(engine: EngineProcess, prompt: list[int]) -> None:
    """The server drains in-flight requests on SIGTERM; its engine must outlive the signal."""
    os.kill(engine.pid, signal.SIGTERM)
    time.sleep(0.2)
    assert engine.is_running
    assert len(asyncio.run(_collect(engine.generate(prompt, GREEDY)))[1]) == 12


def test_a_killed_child_fails_open_streams_and_later_calls(prompt: list[int]) -> None:
    engine = EngineProcess(CONFIG)
    try:

        async def kill_mid_stream() -> int:
            seen = 0
            params = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
            with pytest.raises(EngineDeadError, match="exited"):
                async for _ in engine.generate(prompt, params):
                    seen += 1
                    if seen == 2:
                        os.kill(engine.pid, signal.SIGKILL)
            return seen

        assert asyncio.run(kill_mid_stream()) >= 2
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            asyncio.run(_collect(engine.generate(prompt, GREEDY)))
    finally:
        engine.shutdown()


def test_shutdown_stops_the_child_and_refuses_new_work(prompt: list[int]) -> None:
    engine = EngineProcess(CONFIG)
    engine.shutdown()
    assert not engine.is_running
    assert _wait_until(lambda: _exited(engine.pid))
    with pytest.raises(EngineDeadError, match="shut down"):
        asyncio.run(_collect(engine.generate(prompt, GREEDY)))


def test_a_model_that_cannot_load_fails_the_start_with_the_childs_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    missing.write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError, match=r"nope\.gguf"):
        EngineProcess(EngineConfig(model=str(missing)))


def test_the_child_exits_when_its_parent_is_killed() -> None:
    script = (
        "from talkloop.engine.config import EngineConfig\n"
        "from talkloop.engine.engine_process import EngineProcess\n"
        "import sys, time\n"
        "engine = EngineProcess(EngineConfig(dtype='bfloat16', num_threads=1))\n"
        "print(engine.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not _exited(child)
        parent.kill()
        parent.wait()
        assert _wait_until(lambda: _exited(child)), "the engine process outlived its parent"
    finally:
        parent.kill()


def _exited(pid: int) -> bool:
    """Whether `pid` is gone (or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_child_is_pinned_to_as_many_cpus_as_it_has_threads(engine: EngineProcess) -> None:
    usable = sorted(os.sched_getaffinity(0))
    expected = engine_cpus(CONFIG.num_threads)
    if len(usable) > 1:
        assert expected == usable[:1]
    assert os.sched_getaffinity(engine.pid) == set(expected or usable)
    assert engine_cpus(None) is None and engine_cpus(len(usable)) is None


def test_a_request_id_in_use_is_refused_and_the_first_request_goes_on(
    engine: EngineProcess, prompt: list[int]
) -> None:
    async def twice() -> tuple[str, list[int], str | None]:
        first = engine.generate(prompt, GREEDY, "same-id")
        head = await anext(first)
        with pytest.raises(InvalidRequestError, match="already in use"):
            await _collect(engine.generate(prompt, GREEDY, "same-id"))
        text, tokens, reason = await _collect(first)
        return text, [*(t for d in head.deltas for t in d.token_ids), *tokens], reason

    _, tokens, reason = asyncio.run(twice())
    assert len(tokens) == 12 and reason == "length"
