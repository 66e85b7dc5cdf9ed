"""The `talkloop` command as a user runs it (bundled model)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def _talkloop(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "talkloop.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_generate_streams_an_answer() -> None:
    proc = _talkloop(
        "generate",
        "What is the capital city of France? Reply with the city name.",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_generate_bad_sampling_value_is_a_clear_error() -> None:
    proc = _talkloop("generate", "hi", "--top-p", "0")
    assert proc.returncode == 2
    assert "top_p must be in (0, 1]" in proc.stderr


def test_chat_session_with_commands() -> None:
    script = (
        "/system You answer in one short sentence.\nWhat is the sum of 2 and 2?\n"
        "/reset\n/help\n/quit\n"
    )
    proc = _talkloop("chat", "--temperature", "0", "--max-tokens", "24", stdin=script)
    assert proc.returncode == 0, proc.stderr
    assert "system prompt set" in proc.stdout
    assert "conversation cleared" in proc.stdout
    assert "bot> " in proc.stdout and "4" in proc.stdout.split("bot> ", 1)[1]
    assert "/reset clears" in proc.stdout
