"""Engine behaviour per request: stops, lengths, n, seeds, abort, bad input, async streams."""

from __future__ import annotations

import asyncio

import pytest

from talkloop.engine.async_engine import AsyncEngine
from talkloop.engine.errors import InvalidRequestError
from talkloop.engine.output_processor import TextState, append_text, take_delta
from talkloop.engine.sampling_params import SamplingParams
from talkloop.engine.sequence import FinishReason, Sequence
from tests.engine.tiny import (
    ByteDetokenizer,
    assert_no_leaked_blocks,
    encode_bytes,
    greedy,
    run_to_completion,
    tiny_config,
    tiny_engine,
    tiny_model,
)

MODEL = tiny_model(tiny_config("llama"), seed=11)
PROMPT = encode_bytes("Hello there, how are you?")


def _collect(engine, request_id="a"):
    text, tokens, reasons = "", [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id:
                for d in out.deltas:
                    text += d.text
                    tokens += d.token_ids
                    if d.finish_reason:
                        reasons.append((d.finish_reason, d.stop_reason))
    return text, tokens, reasons


def _stream_tokens(text: str, stop: tuple[str, ...]) -> tuple[str, list[str]]:
    seq = Sequence(0, "r", 0, [1], SamplingParams(stop=stop))
    state = TextState(ByteDetokenizer())
    emitted = []
    for token in encode_bytes(text):
        seq.append_token(token)
        if append_text(state, seq, token):
            seq.finish(FinishReason.STOP)
        emitted.append(take_delta(state, seq).text)
        if seq.is_finished:
            break
    return "".join(emitted), emitted


def test_stop_string_across_tokens_is_not_emitted() -> None:
    full, pieces = _stream_tokens("abc END xyz", stop=("END",))
    assert full == "abc "
    assert "E" not in "".join(pieces)  # never leaked, even partially


def test_held_back_text_is_released_when_not_a_stop() -> None:
    full, pieces = _stream_tokens("ENTER the END", stop=("END",))
    assert full == "ENTER the "
    assert pieces[:3] == ["", "", "ENT"]  # "EN" held until "T" proves it is no stop


def test_stop_string_with_multibyte_characters() -> None:
    full, _ = _stream_tokens("caf\u00e9 \U0001f600 fin", stop=("\U0001f600",))
    assert full == "caf\u00e9 "


def test_engine_stop_string_and_length() -> None:
    engine = tiny_engine(MODEL)
    engine.add_request("a", PROMPT, greedy(max_tokens=30, ignore_eos=True))
    text, tokens, reasons = _collect(engine)
    assert len(tokens) == 30 and reasons == [("length", None)]
    stop = text[10:13]
    engine.add_request("a", PROMPT, greedy(max_tokens=30, ignore_eos=True, stop=(stop,)))
    stopped, _, reasons = _collect(engine)
    assert stopped == text[: text.index(stop)]
    assert reasons == [("stop", stop)]


def test_stop_token_ids_finish_with_stop() -> None:
    engine = tiny_engine(MODEL)
    engine.add_request("a", PROMPT, greedy(max_tokens=30, ignore_eos=True))
    _, tokens, _ = _collect(engine)
    engine.add_request("a", PROMPT, greedy(max_tokens=30, stop_token_ids=(tokens[4],)))
    _, got, reasons = _collect(engine)
    assert got == tokens[: tokens.index(tokens[4]) + 1]
    assert reasons == [("stop", tokens[4])]


def test_n_choices_and_seeds_are_reproducible_whatever_the_batch() -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7, n=3, ignore_eos=True)
    engine = tiny_engine(MODEL)
    engine.add_request("a", PROMPT, params)
    alone = run_to_completion(engine)
    assert len({tuple(v) for v in alone.values()}) == 3  # the n choices differ
    engine.add_request("x", encode_bytes("noise"), SamplingParams(max_tokens=20, temperature=1.0))
    engine.add_request("a", PROMPT, params)
    engine.add_request("y", encode_bytes("more noise here"), SamplingParams(max_tokens=5))
    crowd = run_to_completion(engine)
    assert {k: v for k, v in crowd.items() if k.startswith("a:")} == alone


def test_abort_frees_blocks_and_others_continue() -> None:
    engine = tiny_engine(MODEL)
    engine.add_request("a", PROMPT, greedy(max_tokens=50, ignore_eos=True))
    engine.add_request("b", PROMPT, greedy(max_tokens=5, ignore_eos=True))
    early = [d.token_ids for _ in range(3) for out in engine.step() for d in out.deltas]
    engine.abort("a")
    tokens = run_to_completion(engine)
    assert "a:0" not in tokens
    # a sampled once per early step (3 tokens); b finished all 5 of its tokens.
    assert sum(len(t) for t in early) + len(tokens["b:0"]) == 3 + 5
    assert_no_leaked_blocks(engine)


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ([], greedy(), "prompt"),
        ([1] * 300, greedy(), "prompt"),  # 64 blocks x 4 = 256 tokens of cache
        ([1] * 200, greedy(max_tokens=100), "max_tokens"),
        ([999], greedy(), "prompt"),
        ([1], SamplingParams(logit_bias={10**6: 1.0}), "logit_bias"),
    ],
)
def test_bad_requests_are_refused_and_others_keep_running(prompt, params, field) -> None:
    engine = tiny_engine(MODEL)
    engine.add_request("good", PROMPT, greedy(max_tokens=5, ignore_eos=True))
    engine.step()
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("bad", prompt, params)
    assert info.value.param == field and field in str(info.value)
    assert len(run_to_completion(engine)["good:0"]) == 4
    assert_no_leaked_blocks(engine)


def test_duplicate_request_id_is_refused() -> None:
    engine = tiny_engine(MODEL)
    engine.add_request("a", PROMPT, greedy())
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("a", PROMPT, greedy())


def test_async_streams_concurrently_and_cancellation_frees_blocks() -> None:
    engine = tiny_engine(MODEL)
    reference = tiny_engine(MODEL)
    reference.add_request("a", PROMPT, greedy(max_tokens=10, ignore_eos=True))
    expected = run_to_completion(reference)["a:0"]
    async_engine = AsyncEngine(engine)

    async def consume(n: int) -> list[int]:
        tokens: list[int] = []
        async for out in async_engine.generate(PROMPT, greedy(max_tokens=n, ignore_eos=True)):
            tokens += out.deltas[0].token_ids
        return tokens

    async def cancel_midway() -> None:
        stream = async_engine.generate(PROMPT, greedy(max_tokens=200, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()

    async def main() -> list[list[int]]:
        results = await asyncio.gather(consume(10), consume(10), cancel_midway())
        with pytest.raises(InvalidRequestError):
            await consume(10_000)
        return [r for r in results if r is not None]

    try:
        results = asyncio.run(main())
        assert results == [expected, expected]
        free = async_engine.call(lambda e: e.block_manager.num_available_blocks).result(timeout=5)
        assert free == engine.block_manager.num_blocks
        assert async_engine.call(lambda e: e.num_requests).result(timeout=5) == 0
    finally:
        async_engine.shutdown()


def test_queue_time_is_reported_from_arrival_to_first_scheduling() -> None:
    engine = tiny_engine(MODEL, max_num_seqs=1)
    engine.add_request("first", PROMPT, greedy(max_tokens=3, ignore_eos=True))
    engine.add_request("second", PROMPT[:5], greedy(max_tokens=3, ignore_eos=True))
    queued: dict[str, list[float | None]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            queued.setdefault(out.request_id, []).append(out.queue_time_s)
    first, second = queued["first"], queued["second"]
    assert len(set(first)) == 1 and len(set(second)) == 1  # fixed once scheduled
    assert first[0] is not None and second[0] is not None
    # "second" waited while "first" ran all its steps (max_num_seqs=1)
    assert 0 <= first[0] < second[0]


def test_async_engine_builds_its_engine_on_its_own_thread() -> None:
    import threading

    built_on: list[str] = []

    def build():
        built_on.append(threading.current_thread().name)
        return tiny_engine(MODEL)

    async_engine = AsyncEngine(build)
    try:
        assert built_on == ["talkloop-engine"]  # model and steps share one OpenMP team

        async def run() -> list[int]:
            tokens: list[int] = []
            params = greedy(max_tokens=4, ignore_eos=True)
            async for out in async_engine.generate(PROMPT, params, "a"):
                tokens += [t for d in out.deltas for t in d.token_ids]
            return tokens

        assert len(asyncio.run(run())) == 4
    finally:
        async_engine.shutdown()


def test_async_engine_raises_what_building_raised() -> None:
    def build():
        raise ValueError("no such model file: x.gguf")

    with pytest.raises(ValueError, match="no such model file"):
        AsyncEngine(build)


def test_work_called_on_the_loop_thread_reports_its_errors_and_the_loop_lives_on() -> None:
    import threading

    async_engine = AsyncEngine(tiny_engine(MODEL))
    try:
        name = async_engine.call(lambda engine: threading.current_thread().name).result(10)
        assert name == "talkloop-engine"

        def fail(engine):
            raise RuntimeError("embedding failed")

        with pytest.raises(RuntimeError, match="embedding failed"):
            async_engine.call(fail).result(10)
        assert async_engine.is_running

        async def run() -> int:
            params = greedy(max_tokens=3, ignore_eos=True)
            outs = [o async for o in async_engine.generate(PROMPT, params, "after")]
            return sum(len(d.token_ids) for o in outs for d in o.deltas)

        assert asyncio.run(run()) == 3
    finally:
        async_engine.shutdown()


def test_work_still_queued_when_the_loop_dies_fails_instead_of_waiting() -> None:
    import threading

    from talkloop.engine.errors import EngineDeadError

    class LoopKiller(BaseException):  # not an Exception: nothing on the loop catches it
        pass

    async_engine = AsyncEngine(tiny_engine(MODEL))
    release = threading.Event()

    def block_then_die(engine):
        release.wait(10)
        raise LoopKiller

    first = async_engine.call(block_then_die)
    queued = async_engine.call(lambda engine: "never runs")
    release.set()
    for waiting in (first, queued):  # the one that killed the loop, and the one behind it
        with pytest.raises(EngineDeadError):
            waiting.result(10)
    with pytest.raises(EngineDeadError):
        async_engine.call(lambda engine: None)
