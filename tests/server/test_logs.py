"""Structured logs: JSON lines with the request id, extra fields, and an access line per request."""

from __future__ import annotations

import json
import logging

import pytest

from talkloop.server.logs import JsonFormatter, configure_logging
from talkloop.server.middleware import RequestIdLogFilter, request_id_var


def test_json_lines_carry_request_id_extra_fields_and_exceptions() -> None:
    record = logging.makeLogRecord(
        {"name": "talkloop.x", "levelname": "ERROR", "msg": "failed %s", "args": ("here",)}
    )
    record.status = 503
    record.color_message = "\x1b[36mfailed\x1b[0m"  # uvicorn's coloured copy: dropped
    token = request_id_var.set("req-1")
    try:
        RequestIdLogFilter().filter(record)
    finally:
        request_id_var.reset(token)
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["message"] == "failed here" and entry["level"] == "error"
    assert entry["request_id"] == "req-1" and entry["status"] == 503
    assert entry["logger"] == "talkloop.x" and "ValueError: boom" in entry["exc_info"]
    assert "color_message" not in entry


def test_configure_logging_text_or_json(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        configure_logging("info", "json")
        logging.getLogger("talkloop.t").info("hello %d", 1, extra={"k": "v"})
        configure_logging("warning", "text")
        logging.getLogger("talkloop.t").info("hidden")
        logging.getLogger("talkloop.t").warning("shown")
        err = capsys.readouterr().err.splitlines()
    finally:
        logging.basicConfig(force=True)
    assert json.loads(err[0])["message"] == "hello 1" and json.loads(err[0])["k"] == "v"
    assert len(err) == 2 and err[1].endswith("WARNING talkloop.t [-] shown")
