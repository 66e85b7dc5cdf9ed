"""The benchmarks' streaming client: OpenAI-style SSE over aiohttp, parsed line by line.

On this 2-core machine the client shares the cores with the server it measures, so its CPU
per streamed chunk is taken from the server: httpx's streaming spent ~290 us of CPU per chunk
here, aiohttp ~117 us (what vLLM's own serving benchmark uses). Every peer is driven by this
same client.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

# What a failed stream raises (transport, timeout, bad JSON, non-200 status).
STREAM_ERRORS = (aiohttp.ClientError, TimeoutError, json.JSONDecodeError)


class HttpStatusError(aiohttp.ClientError):
    """A non-200 answer; the message holds the status and the start of the body."""


def new_session(max_connections: int = 256, timeout_s: float = 900.0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections),
        timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=10.0),
    )


@asynccontextmanager
async def sse_events(
    session: aiohttp.ClientSession,
    url: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
    """`async with sse_events(...) as events:` then `async for event in events` (the JSON of
    each `data:` line, `[DONE]` left out). Raises HttpStatusError before the first event."""
    async with session.post(url, json=body, headers=headers) as response:
        if response.status != 200:
            text = (await response.read()).decode(errors="replace")
            raise HttpStatusError(f"HTTP {response.status}: {text[:300]}")
        yield _events(response.content)


async def _events(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    async for raw in content:  # one line per iteration
        if not raw.startswith(b"data: "):
            continue
        data = raw[6:].strip()
        if data != b"[DONE]":
            yield json.loads(data)
