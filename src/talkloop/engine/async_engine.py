"""`AsyncEngine`: the step loop in a background thread, an async stream per request.

The loop thread alone touches the `LLMEngine`; callers talk to it through a command queue.
Closing or cancelling a request's stream aborts it and frees its cache blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from talkloop.engine.errors import EngineDeadError, InvalidRequestError
from talkloop.engine.llm_engine import LLMEngine
from talkloop.engine.outputs import RequestOutput
from talkloop.engine.sampling_params import SamplingParams
from talkloop.engine.system import setup_torch

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]

    def put(self, item: RequestOutput | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody reads this stream
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _deliver(
    items: list[tuple[asyncio.Queue[RequestOutput | BaseException], RequestOutput]],
) -> None:
    for queue_, output in items:
        queue_.put_nowait(output)


class StreamTable:
    """Each live request's stream, by request id; thread-safe.

    The engine's side hands a step's outputs over with `dispatch`; callers read their stream
    with `read`. Shared by `AsyncEngine` (engine thread) and `EngineProcess` (its reader thread).
    """

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()

    @staticmethod
    def new_stream() -> _Stream:
        return _Stream(asyncio.get_running_loop(), asyncio.Queue())

    def add(self, request_id: str, stream: _Stream) -> None:
        with self._lock:
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream

    def remove(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def fail(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(exc)

    def fail_all(self, exc: BaseException) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.put(exc)

    def dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop, not per request
        (each `call_soon_threadsafe` writes to the loop's self-pipe)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], RequestOutput]]]
        by_loop = {}
        with self._lock:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue
                by_loop.setdefault(stream.loop, []).append((stream.queue, output))
                if output.finished:
                    del self._streams[output.request_id]
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody reads those streams
                loop.call_soon_threadsafe(_deliver, items)

    @staticmethod
    async def read(
        stream: _Stream, abort: Callable[[], None]
    ) -> AsyncGenerator[RequestOutput, None]:
        """The stream's outputs up to the finished one; `abort()` if the reader stops early."""
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                abort()


class AsyncEngine:
    """`engine` is an `LLMEngine`, or a function that builds one: then it is built on the loop
    thread (the constructor waits and raises what building raised).

    NOTE: build it there when you can. Each thread that runs parallel torch ops gets its own
    OpenMP team; once the process holds more OpenMP threads than CPUs, libgomp stops spinning
    between parallel regions and every op pays a wake-up: decoding on a loop thread whose
    model was loaded on another thread was measured 1.6x slower on 2 cores.
    """

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine]) -> None:
        built: Future[LLMEngine] = Future()
        if isinstance(engine, LLMEngine):
            self.engine = engine
            built.set_result(engine)
            self._build: Callable[[], LLMEngine] | None = None
        else:
            self._build = engine
        self._built = built
        self._commands: queue.SimpleQueue[tuple[Callable[[], None], Future[Any] | None]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._current_waiter: Future[Any] | None = None  # of the command the loop is running
        self._wakeup = threading.Event()
        self._streams = StreamTable()
        self._ids = itertools.count()
        self._stopped = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="talkloop-engine", daemon=True)
        self._thread.start()
        self.engine = built.result()

    # ---- caller side ------------------------------------------------------------------------
    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's deltas; raises InvalidRequestError before the first one."""
        request_id = request_id or f"req-{next(self._ids)}"
        stream = self._streams.new_stream()
        added: Future[None] = Future()
        self._submit(lambda: self._add(request_id, prompt_token_ids, params, stream, added), added)
        await asyncio.wrap_future(added)
        outputs = self._streams.read(stream, lambda: self.abort(request_id))
        async with contextlib.aclosing(outputs):
            async for output in outputs:
                yield output

    def abort(self, request_id: str) -> None:
        self._submit(lambda: self._abort(request_id))

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> dict[str, float]:
        """The engine's gauges, read from this thread (each a plain attribute read)."""
        return self.engine.stats()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout_s)

    def call(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Run `fn(engine)` on the loop thread between steps; its result (or error) as a future.

        Other torch work belongs here too (embeddings): see the NOTE on the class."""
        result: Future[T] = Future()

        def run() -> None:
            try:
                result.set_result(fn(self.engine))
            except Exception as exc:  # the caller's error, not the loop's
                result.set_exception(exc)

        self._submit(run, result)
        return result

    def _submit(self, command: Callable[[], None], waiter: Future[Any] | None = None) -> None:
        """Queue `command` for the loop; if the loop dies first, `waiter` gets EngineDeadError."""
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(f"the engine loop stopped: {self._dead}")
            self._commands.put((command, waiter))
        self._wakeup.set()

    # ---- loop thread --------------------------------------------------------------------------
    def _add(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        stream: _Stream,
        added: Future[None],
    ) -> None:
        try:
            self.engine.add_request(request_id, prompt_token_ids, params)
        except Exception as exc:
            added.set_exception(exc)
            return
        self._streams.add(request_id, stream)
        added.set_result(None)

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._streams.remove(request_id)

    def _drain_commands(self) -> None:
        while True:
            try:
                command, self._current_waiter = self._commands.get_nowait()
            except queue.Empty:
                return
            command()
            self._current_waiter = None

    def _run(self) -> None:
        if self._build is not None:
            try:
                self.engine = self._build()
            except BaseException as exc:
                self._built.set_exception(exc)
                return
            self._built.set_result(self.engine)
        setup_torch(self.engine.config)  # flush-to-zero and thread count are per-thread state
        try:
            while not self._stopped:
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
                    continue
                self._streams.dispatch(self.engine.step())
        except BaseException as exc:  # the loop must never die silently
            logger.exception("engine loop died")
            dead = EngineDeadError(f"the engine loop stopped: {exc}")
            with self._lock:  # nothing is queued after this, and nothing queued waits forever
                self._dead = exc
                waiters = [self._current_waiter]
                while not self._commands.empty():
                    waiters.append(self._commands.get_nowait()[1])
            for waiter in waiters:
                if waiter is not None and not waiter.done():
                    waiter.set_exception(dead)
            self._streams.fail_all(EngineDeadError(f"the engine loop stopped: {exc}"))
