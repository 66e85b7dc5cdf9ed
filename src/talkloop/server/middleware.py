"""ASGI middleware: a request id on every request, and draining on shutdown.

Pure ASGI (not BaseHTTPMiddleware) so streamed bodies and client disconnects pass through
untouched. The request id is generated here (a client's own `x-request-id` is only logged),
so metering keyed by it cannot be dodged by replaying an id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from talkloop.server.errors import ShuttingDownError

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("talkloop.access")

REQUEST_ID_HEADER = "x-request-id"
request_id_var: ContextVar[str] = ContextVar("talkloop_request_id", default="-")
ALWAYS_OPEN_PATHS = frozenset({"/health"})


def new_request_id() -> str:
    return secrets.token_hex(12)


class RequestIdLogFilter(logging.Filter):
    """Adds `record.request_id` (for a `%(request_id)s` log format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        status = 500  # if the app fails before it starts a response

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._log_access(scope, status, time.perf_counter() - start)
            request_id_var.reset(token)

    @staticmethod
    def _log_access(scope: Scope, status: int, seconds: float) -> None:
        """One line per request, after its body (a stream's whole duration)."""
        if not access_logger.isEnabledFor(logging.INFO):
            return
        method, path = scope["method"], scope["path"]
        client = scope.get("client")
        headers = dict(scope.get("headers") or ())
        access_logger.info(
            "%s %s %d",
            method,
            path,
            status,
            extra={
                "method": method,
                "path": path,
                "status": status,
                "duration_ms": round(seconds * 1000, 1),
                "client": f"{client[0]}:{client[1]}" if client else None,
                "client_request_id": headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
                or None,
            },
        )


class DrainGate:
    """Counts in-flight requests; once draining, new requests are refused."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def start_draining(self) -> None:
        if not self.draining:
            logger.info("draining: refusing new requests, %d in flight", self.in_flight)
        self.draining = True

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


class DrainMiddleware:
    def __init__(self, app: ASGIApp, gate: DrainGate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ALWAYS_OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.gate.draining:
            await _refuse(send)
            return
        self.gate.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.leave()


async def _refuse(send: Send) -> None:
    error = ShuttingDownError("the server is shutting down; retry on another replica")
    body = json.dumps(error.body()).encode()
    headers: list[Any] = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
