"""`talkloop serve` as an operator runs it: first-start admin key, SIGTERM drains in-flight
streams, refuses new requests, flushes the usage ledger, then exits."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

KEY_BANNER = "created the admin API key"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    def __init__(self, data_dir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "talkloop.cli", "serve", "--port", str(self.port)]
        command += ["--data-dir", str(data_dir), "--dtype", "bfloat16"]
        # The engine in its own process, which ignores the SIGTERM and is stopped after the drain.
        env = {**os.environ, "TALKLOOP_DRAIN_TIMEOUT_S": "30", "TALKLOOP_ENGINE_PROCESS": "true"}
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def admin_key(self, timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.lines.get(timeout=deadline - time.monotonic())
            if KEY_BANNER in line:
                return self.lines.get(timeout=5).strip()
        raise AssertionError("no admin key was printed")

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server never became ready")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    running = Served(tmp_path)
    yield running
    if running.proc.poll() is None:
        running.proc.kill()
        running.proc.wait(10)


def test_sigterm_drains_streams_refuses_new_work_and_flushes_the_ledger(
    served: Served, tmp_path: Path
) -> None:
    key = served.admin_key()
    served.wait_ready()
    headers = {"Authorization": f"Bearer {key}"}
    body = {
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 16,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(base_url=served.url, headers=headers, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        served.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            refused = httpx.get(f"{served.url}/v1/models", headers=headers, timeout=5)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "shutting_down"
        except httpx.TransportError:
            pass  # the listening socket is already closed: refused as well
        events = [line for line in lines if line]
    # The stream ran to its end: the finish_reason chunk, then [DONE]. (Not one event per
    # token: a token whose text is held back, a cut UTF-8 character say, sends no event.)
    assert events[-1] == "data: [DONE]"
    finish = json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"]
    assert finish == "length"
    assert 1 + 8 <= len(events) <= 1 + 16 + 1
    # uvicorn re-raises the captured SIGTERM once shutdown is complete, as process managers expect
    assert served.proc.wait(60) in (0, -signal.SIGTERM)
    with sqlite3.connect(tmp_path / "talkloop.db") as db:
        row = db.execute(
            "SELECT status, completion_tokens FROM usage_ledger WHERE request_id = ?",
            (request_id,),
        ).fetchone()
    assert row == ("ok", 16)
    # Logs are JSON lines; the stream's access line carries its request id and final status.
    printed = []
    while not served.lines.empty():
        printed.append(served.lines.get())
    logs = [json.loads(line) for line in printed if line.startswith("{")]
    assert logs and all({"ts", "level", "logger", "message", "request_id"} <= set(e) for e in logs)
    [access] = [
        e for e in logs if e["logger"] == "talkloop.access" and e["request_id"] == request_id
    ]
    assert access["path"] == "/v1/chat/completions" and access["status"] == 200
    assert access["duration_ms"] > 0
