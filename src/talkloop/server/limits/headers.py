"""OpenAI's `x-ratelimit-*` response headers, and the middleware that adds them.

The limit check runs deep inside a handler (after the body names `max_tokens`), so it
publishes its headers into a per-request dict that this middleware set up; the middleware
adds them to whatever response goes out, a 429 or a stream alike.
"""

from __future__ import annotations

from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from talkloop.server.limits.limiter import LimitState

_published: ContextVar[dict[str, str] | None] = ContextVar("talkloop_ratelimit", default=None)


def format_reset(seconds: float) -> str:
    """A duration as OpenAI writes it: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1.0:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60.0)
    rest_text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest_text}s" if minutes else f"{rest_text}s"


def limit_headers(kind: str, state: LimitState) -> dict[str, str]:
    """The trio for `kind` ("requests" or "tokens")."""
    return {
        f"x-ratelimit-limit-{kind}": str(state.limit),
        f"x-ratelimit-remaining-{kind}": str(state.remaining),
        f"x-ratelimit-reset-{kind}": format_reset(state.reset_s),
    }


def publish(headers: dict[str, str]) -> None:
    """Attach `headers` to the current request's response (a no-op outside a request)."""
    target = _published.get()
    if target is not None:
        target.update(headers)


class RateLimitHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        token = _published.set(headers)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and headers:
                raw = list(message.get("headers", []))
                raw += [(name.encode(), value.encode()) for name, value in headers.items()]
                message = {**message, "headers": raw}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            _published.reset(token)
