"""Structured logs: one JSON object per line, each carrying the request id it was logged under.

`configure_logging` installs one stderr handler on the root logger for the whole process
(talkloop, uvicorn, SQLAlchemy alike). Fields passed with `extra=` land in the object as they
are, so an access line reads `{"message": "POST /v1/chat/completions 200", "status": 200, ...}`.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from talkloop.server.middleware import RequestIdLogFilter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# Attributes every LogRecord has; anything else on a record came from `extra=` (except
# uvicorn's `color_message`, the message again with terminal colour codes).
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "request_id",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str | int = "info", fmt: str = "json") -> None:
    """Route every logger to stderr in `fmt` ("json" or "text") at `level`."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdLogFilter())
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    numeric = level if isinstance(level, int) else logging.getLevelName(level.upper())
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
