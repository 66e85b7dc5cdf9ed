"""Replay client: streamed chat completions against any OpenAI-compatible server, timed.

One `stream_chat` measures a request (TTFT, end-to-end, output tokens, cached prompt tokens);
`replay_trace` plays a `ChatTrace` (each user's next turn only after its previous reply, that
reply kept in the history); `decode`, `prefill` and `concurrent` are the synthetic tasks.
Every request has a timeout and every run a deadline.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from chat_peers import SERVED_MODEL, Server
from chat_workload import ChatTrace, UserSession
from sse_client import STREAM_ERRORS, new_session, sse_events

REQUEST_TIMEOUT_S = 900.0
FILLER = (
    "The lighthouse keeper counted the ships each evening and wrote their names in a ledger "
    "that smelled of salt and candle wax. Some nights the fog rolled in so thick that only "
    "the horn could speak for him, a low note that travelled across the bay to the village. "
)


@dataclass(frozen=True)
class RequestRecord:
    sent_s: float  # offset from the run's start
    ttft_s: float
    e2e_s: float
    num_output_tokens: int
    num_prompt_tokens: int  # 0 where the server sent no usage
    num_cached_tokens: int
    text: str
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)


def _failed(sent_s: float, start: float, error: str) -> RequestRecord:
    return RequestRecord(sent_s, 0.0, time.perf_counter() - start, 0, 0, 0, "", error)


async def stream_chat(
    client: aiohttp.ClientSession,
    server: Server,
    messages: list[dict[str, str]],
    max_tokens: int,
    run_start: float,
) -> RequestRecord:
    body = {
        "model": SERVED_MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **server.length_fields,
    }
    headers = {"Authorization": f"Bearer {server.api_key}"}
    start = time.perf_counter()
    sent_s = start - run_start
    first: float | None = None
    pieces: list[str] = []
    num_chunks = 0
    usage: dict[str, Any] = {}
    try:
        url = f"{server.base_url}/v1/chat/completions"
        async with sse_events(client, url, body, headers) as events:
            async for chunk in events:
                if "error" in chunk:
                    return _failed(sent_s, start, f"stream error: {chunk['error']}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        first = first or time.perf_counter()
                        pieces.append(content)
                        num_chunks += 1
    except STREAM_ERRORS as exc:
        return _failed(sent_s, start, f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    details = usage.get("prompt_tokens_details") or {}
    return RequestRecord(
        sent_s=sent_s,
        ttft_s=(first or end) - start,
        e2e_s=end - start,
        num_output_tokens=int(usage.get("completion_tokens") or num_chunks),
        num_prompt_tokens=int(usage.get("prompt_tokens") or 0),
        num_cached_tokens=int(details.get("cached_tokens") or 0),
        text="".join(pieces),
    )


def new_client() -> aiohttp.ClientSession:
    return new_session(max_connections=128, timeout_s=REQUEST_TIMEOUT_S)


# ---- trace ----------------------------------------------------------------------------------
async def _run_user(
    client: aiohttp.ClientSession,
    server: Server,
    trace: ChatTrace,
    user: UserSession,
    run_start: float,
    records: list[RequestRecord],
) -> None:
    await asyncio.sleep(max(0.0, run_start + user.start_s - time.perf_counter()))
    history = [{"role": "system", "content": trace.personas[user.persona_index]}]
    for turn in user.turns:
        await asyncio.sleep(turn.think_s)
        history.append({"role": "user", "content": turn.text})
        record = await stream_chat(client, server, history, turn.max_tokens, run_start)
        records.append(record)
        if record.error:
            return
        history.append({"role": "assistant", "content": record.text})


async def replay_trace(server: Server, trace: ChatTrace, deadline_s: float) -> dict[str, Any]:
    records: list[RequestRecord] = []
    async with new_client() as client:
        run_start = time.perf_counter()
        users = [_run_user(client, server, trace, u, run_start, records) for u in trace.users]
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.gather(*users), deadline_s)
        except TimeoutError:
            timed_out = True
        wall_s = time.perf_counter() - run_start
    summary = summarize(records, wall_s)
    summary["num_requests_planned"] = trace.num_requests
    summary["timed_out"] = timed_out
    return summary


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(records: list[RequestRecord], wall_s: float) -> dict[str, Any]:
    ok = [r for r in records if not r.error]
    ttfts = [r.ttft_s for r in ok]
    tpots = [t for r in ok if (t := r.tpot_s) is not None]
    num_output = sum(r.num_output_tokens for r in ok)
    num_prompt = sum(r.num_prompt_tokens for r in ok)
    num_cached = sum(r.num_cached_tokens for r in ok)
    return {
        "num_requests": len(ok),
        "num_errors": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:3],
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "tpot_p50_s": percentile(tpots, 50),
        "e2e_p50_s": percentile([r.e2e_s for r in ok], 50),
        "wall_s": wall_s,
        "output_tokens": num_output,
        "output_tok_s": num_output / wall_s if wall_s > 0 else None,
        "prompt_tokens_reported": num_prompt,
        "usage_cached_fraction": num_cached / num_prompt if num_prompt else None,
    }


# ---- synthetic tasks ------------------------------------------------------------------------
def filler_text(count_tokens: Any, num_tokens: int, salt: str) -> str:
    """`salt` first (so no two prompts share a cached prefix), then filler to `num_tokens`."""
    text = f"[{salt}] "
    while count_tokens(text) < num_tokens:
        text += FILLER
    words = text.split(" ")
    while len(words) > 1 and count_tokens(" ".join(words)) > num_tokens:
        words = words[:-1]
    return " ".join(words)


async def decode_task(server: Server, salt: str, max_tokens: int) -> dict[str, Any]:
    """Single-stream decode: output tokens after the first, per second of streaming."""
    messages = [{"role": "user", "content": f"[{salt}] Tell me a long story about the sea."}]
    async with new_client() as client:
        record = await stream_chat(client, server, messages, max_tokens, time.perf_counter())
    if record.error or record.num_output_tokens < 2:
        return {"error": record.error or "too few tokens"}
    decode_s = record.e2e_s - record.ttft_s
    return {
        "tok_s": (record.num_output_tokens - 1) / decode_s,
        "num_output_tokens": record.num_output_tokens,
    }


async def prefill_task(server: Server, prompt: str, num_prompt_tokens: int) -> dict[str, Any]:
    """TTFT of one uncached prompt with max_tokens=1; tok/s = prompt tokens / TTFT."""
    messages = [{"role": "user", "content": prompt}]
    async with new_client() as client:
        record = await stream_chat(client, server, messages, 1, time.perf_counter())
    if record.error:
        return {"error": record.error}
    num_tokens = record.num_prompt_tokens or num_prompt_tokens
    return {
        "ttft_s": record.ttft_s,
        "tok_s": num_tokens / record.ttft_s,
        "prompt_tokens": num_tokens,
    }


async def concurrent_task(
    server: Server, prompts: list[str], max_tokens: int, deadline_s: float
) -> dict[str, Any]:
    """All prompts at once; aggregate end-to-end output tok/s (prefill included)."""
    async with new_client() as client:
        start = time.perf_counter()
        calls = [
            stream_chat(client, server, [{"role": "user", "content": p}], max_tokens, start)
            for p in prompts
        ]
        records = await asyncio.wait_for(asyncio.gather(*calls), deadline_s)
        wall_s = time.perf_counter() - start
    summary = summarize(list(records), wall_s)
    return {
        "tok_s": summary["output_tok_s"],
        "wall_s": wall_s,
        "ttft_p50_s": summary["ttft_p50_s"],
        "tpot_p50_s": summary["tpot_p50_s"],
        "output_tokens": summary["output_tokens"],
        "num_errors": summary["num_errors"],
    } | ({"error": _failures(summary)} if summary["num_errors"] else {})


def _failures(summary: dict[str, Any]) -> str:
    """A run with failed requests has no valid aggregate rate: say how many and why."""
    total = summary["num_requests"] + summary["num_errors"]
    return f"{summary['num_errors']} of {total} requests failed: {summary['errors'][:1]}"


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None
