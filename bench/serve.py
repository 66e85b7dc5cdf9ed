"""Serving benchmark: simulated chat users over HTTP against `talkloop serve`, and the server's
own overhead against the same engine called in-process.

Each user holds a scripted character-chat conversation (a long persona prompt shared by every
user, a growing history of short turns) and streams one reply per turn, back to back, so
`concurrency` users keep that many requests in flight. Per level it reports time to first token
(TTFT), inter-token latency (ITL, the gaps between streamed chunks) and end-to-end latency
(p50/p95/p99), goodput (requests/s meeting the SLO: TTFT and mean ITL under their bounds) and
errors. The same prompts also go through the engine called directly: `build_backend` on the
same settings, but with the engine on a thread of this process (`engine_process=False`) where
`talkloop serve` runs it in a process of its own (the stricter baseline: no pipe between the
caller and the engine). The two modes take turns per level, in alternating order (a drift
over the run hits both alike): overhead = (TTFT over HTTP - TTFT direct) / TTFT over HTTP, per
level (target: < 5% at 16).
`--threads` is the engine's thread count in both modes. With every core given to the engine
(the default on 2 cores), the server and this load generator take their CPU from the engine's
steps; with one core left to them (`--threads` = cores - 1, as vLLM advises for its CPU
backend) the overhead is the server's own.
Replies are greedy with a fixed length (`ignore_eos`), so both sides do the same work.
Users think between turns (`--think-s`, mean seconds; each user's first turn is delayed the
same way), from seeded generators, so both modes see the same arrival pattern. With
`--think-s 0` every user fires the next turn the moment a reply ends: fixed-length replies then
end on the same engine step, and each wave of requests lands together, which makes TTFT a
measure of which engine step a request's arrival catches rather than of the server.

    .venv/bin/python bench/serve.py                                   # 1, 4, 16 users
    .venv/bin/python bench/serve.py --concurrency 1 4 --turns 2 --max-tokens 16   # quick look
Results: bench/results/serve.json and serve.md (`--out` to write elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import httpx

from sse_client import HttpStatusError, new_session, sse_events

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODEL = "smollm2"

PERSONA = (
    "You are Captain Mara Vell, the weathered harbour master of Saltmarrow, a fishing town on a "
    "cold northern coast. You speak plainly, with dry humour, and you know every boat, tide and "
    "rumour in the bay. You remember the great storm of the year the lighthouse went dark, the "
    "smugglers who used the sea caves, and the old songs the net-menders sing. Stay in character; "
    "answer in two or three sentences; never mention that you are an AI. "
) * 3
USER_TURNS = [
    "Good evening, captain. Is the harbour safe tonight?",
    "What happened the year the lighthouse went dark?",
    "Who used the sea caves back then?",
    "Do the net-menders still sing the old songs?",
    "Which boat would you trust in a storm?",
    "Tell me a rumour nobody else in town knows.",
    "What should a stranger never do in Saltmarrow?",
    "Thank you, captain. Same time tomorrow?",
]
SCRIPTED_REPLY = "Aye, the tide is turning and the gulls are restless, but we have seen worse."


def conversation(user: int, turn: int) -> list[dict[str, str]]:
    """User `user`'s messages at `turn`: persona, scripted history, then the new question."""
    messages = [{"role": "system", "content": PERSONA}]
    for past in range(turn):
        messages += [
            {"role": "user", "content": USER_TURNS[(user + past) % len(USER_TURNS)]},
            {"role": "assistant", "content": SCRIPTED_REPLY},
        ]
    messages.append({"role": "user", "content": USER_TURNS[(user + turn) % len(USER_TURNS)]})
    return messages


@dataclass
class RequestResult:
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)  # between streamed chunks with text
    error: str | None = None

    @property
    def mean_itl_s(self) -> float:
        return statistics.fmean(self.gaps_s) if self.gaps_s else 0.0


class Driver(Protocol):
    async def stream(self, messages: list[dict[str, str]], max_tokens: int) -> RequestResult: ...


class HttpDriver:
    """Streams `/v1/chat/completions` with the benchmarks' aiohttp client (`sse_client`)."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self.url = f"{base_url}/v1/chat/completions"
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.session: aiohttp.ClientSession | None = None  # made on the running loop

    async def stream(self, messages: list[dict[str, str]], max_tokens: int) -> RequestResult:
        body = {
            "model": MODEL,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        if self.session is None:
            self.session = new_session(timeout_s=600.0)
        result, start, last = RequestResult(), time.perf_counter(), None
        try:
            async with sse_events(self.session, self.url, body, self.headers) as events:
                async for event in events:
                    if "error" in event:
                        result.error = str(event["error"].get("message"))
                        return result
                    choices = event.get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):
                        last = _tick(result, start, last)
        except HttpStatusError as exc:
            result.error = str(exc)
            return result
        result.e2e_s = time.perf_counter() - start
        return result

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class DirectDriver:
    """The same requests through `EngineBackend.generate`, in this process."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    async def stream(self, messages: list[dict[str, str]], max_tokens: int) -> RequestResult:
        from talkloop.backends.base import GenerationRequest
        from talkloop.engine.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request = GenerationRequest(secrets.token_hex(8), params, messages=messages)
        result, start, last = RequestResult(), time.perf_counter(), None
        async for chunk in self.backend.generate(request):
            if chunk.text:
                last = _tick(result, start, last)
        result.e2e_s = time.perf_counter() - start
        return result


def _tick(result: RequestResult, start: float, last: float | None) -> float:
    now = time.perf_counter()
    if last is None:
        result.ttft_s = now - start
    else:
        result.gaps_s.append(now - last)
    return now


async def run_level(
    driver: Driver, concurrency: int, turns: int, max_tokens: int, think_s: float = 0.0
) -> tuple[list[RequestResult], float]:
    """`concurrency` users, each `turns` turns with think time between; (results, wall s)."""

    async def user(index: int) -> list[RequestResult]:
        results = []
        rng = random.Random(index)
        for turn in range(turns):
            if think_s > 0:  # uniform in [0.5, 1.5] x the mean; before the first turn too
                await asyncio.sleep(think_s * rng.uniform(0.5, 1.5))
            try:
                results.append(await driver.stream(conversation(index, turn), max_tokens))
            except Exception as exc:  # a failed request is a result, not the end of the run
                results.append(RequestResult(error=f"{type(exc).__name__}: {exc}"))
        return results

    start = time.perf_counter()
    per_user = await asyncio.gather(*(user(i) for i in range(concurrency)))
    return [r for results in per_user for r in results], time.perf_counter() - start


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0}
    ordered = sorted(values)

    def pick(q: float) -> float:  # nearest rank
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))] * 1e3

    mean_ms = statistics.fmean(ordered) * 1e3
    return {"p50_ms": pick(0.5), "p95_ms": pick(0.95), "p99_ms": pick(0.99), "mean_ms": mean_ms}


def summarise(
    results: list[RequestResult], wall_s: float, slo_ttft_s: float, slo_itl_s: float
) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    good = [r for r in ok if r.ttft_s < slo_ttft_s and r.mean_itl_s < slo_itl_s]
    num_tokens = sum(len(r.gaps_s) + 1 for r in ok)
    return {
        "num_requests": len(results),
        "num_errors": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "wall_s": round(wall_s, 3),
        "ttft": percentiles([r.ttft_s for r in ok]),
        "itl": percentiles([gap for r in ok for gap in r.gaps_s]),
        "e2e": percentiles([r.e2e_s for r in ok]),
        "goodput_rps": len(good) / wall_s if wall_s else 0.0,
        "slo_attainment": len(good) / len(results) if results else 0.0,
        "throughput_rps": len(ok) / wall_s if wall_s else 0.0,
        "output_tok_s": num_tokens / wall_s if wall_s else 0.0,
        "num_tokens": num_tokens,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(data_dir: str, api_key: str, threads: int) -> dict[str, str]:
    """`talkloop serve` settings: dev mode with a known admin key (imported at bootstrap)."""
    return {
        **os.environ,
        "TALKLOOP_DATA_DIR": data_dir,
        "TALKLOOP_ADMIN_KEY": api_key,
        "TALKLOOP_DEV_MODE": "true",
        "TALKLOOP_SERVED_MODEL_NAME": MODEL,
        "TALKLOOP_NUM_THREADS": str(threads),
        "TALKLOOP_LOAD_BUNDLED_CHARACTERS": "false",
    }


def start_server(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "talkloop.cli", "serve", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"talkloop serve exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("talkloop serve did not become ready in 180 s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def _stat_cpu_s(path: str) -> float:
    """User + system CPU seconds in a /proc `stat` file."""
    with open(path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int, tid: int) -> float:
    """CPU seconds a thread of another process has used so far."""
    return _stat_cpu_s(f"/proc/{pid}/task/{tid}/stat")


def process_cpu_s(pid: int) -> float:
    """CPU seconds every thread of another process has used so far (not its children's: the
    server's engine process is not counted)."""
    return _stat_cpu_s(f"/proc/{pid}/stat")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(
    drivers: dict[str, Driver], args: argparse.Namespace, server_pids: dict[str, int]
) -> dict[str, dict[int, dict[str, Any]]]:
    """Every level, the modes taking turns `--rounds` times, in alternating order (drift on a
    shared machine hits every mode alike); per mode and level, the summary of all its rounds.
    Over HTTP it also counts the CPU that the server (`server_pids[mode]`) and this load
    generator spent: on a machine this small both share the engine's cores."""
    for driver in drivers.values():
        await run_level(driver, 1, 1, 4)  # warm-up: first-request costs are not measured
    summaries: dict[str, dict[int, dict[str, Any]]] = {mode: {} for mode in drivers}
    for concurrency in args.concurrency:
        collected: dict[str, tuple[list[RequestResult], float]] = {m: ([], 0.0) for m in drivers}
        cpu = {m: {"server_loop": 0.0, "server": 0.0, "client": 0.0} for m in server_pids}
        for round_ in range(args.rounds):
            order = list(drivers.items())
            for mode, driver in order if round_ % 2 == 0 else order[::-1]:
                pid = server_pids.get(mode)
                if pid is not None:
                    loop_before = thread_cpu_s(pid, pid)
                    server_before, client_before = process_cpu_s(pid), own_cpu_s()
                results, wall_s = await run_level(
                    driver, concurrency, args.turns, args.max_tokens, args.think_s
                )
                if pid is not None:
                    cpu[mode]["server_loop"] += thread_cpu_s(pid, pid) - loop_before
                    cpu[mode]["server"] += process_cpu_s(pid) - server_before
                    cpu[mode]["client"] += own_cpu_s() - client_before
                previous, previous_s = collected[mode]
                collected[mode] = (previous + results, previous_s + wall_s)
        for mode, (results, wall_s) in collected.items():
            slo = (args.slo_ttft_ms / 1e3, args.slo_itl_ms / 1e3)
            summary = summaries[mode][concurrency] = summarise(results, wall_s, *slo)
            if mode in cpu:
                tokens = max(1, summary["num_tokens"])
                summary["cpu_us_per_token"] = {k: 1e6 * v / tokens for k, v in cpu[mode].items()}
            print(
                f"{mode:12} c={concurrency:<3} TTFT p50 {summary['ttft']['p50_ms']:7.1f} ms  "
                f"ITL p50 {summary['itl']['p50_ms']:6.1f} ms  "
                f"goodput {summary['goodput_rps']:.2f} req/s  errors {summary['num_errors']}",
                flush=True,
            )
    return summaries


def http_modes(args: argparse.Namespace) -> dict[str, str]:
    """Mode name -> `--engine-process` value: one `talkloop serve` each."""
    if len(args.engine_process) == 1:
        return {"http": args.engine_process[0]}
    return {f"http-{value}": value for value in args.engine_process}


def run(args: argparse.Namespace, data_dir: str) -> dict[str, dict[int, dict[str, Any]]]:
    """Start `talkloop serve` (one per `--engine-process` value); load the same engine here
    unless --no-direct; measure every mode."""
    from talkloop.server.app import build_backend
    from talkloop.server.settings import Settings

    servers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        drivers: dict[str, Driver] = {}
        for mode, engine_process in http_modes(args).items():
            api_key, port = secrets.token_urlsafe(32), free_port()
            env = server_env(tempfile.mkdtemp(dir=data_dir), api_key, args.threads)
            if engine_process != "auto":
                env["TALKLOOP_ENGINE_PROCESS"] = engine_process
            servers[mode] = start_server(port, env)
            drivers[mode] = HttpDriver(f"http://127.0.0.1:{port}", api_key)
        backend = None
        if not args.no_direct:
            settings = Settings(
                data_dir=Path(data_dir),
                dev_mode=True,
                served_model_name=MODEL,
                num_threads=args.threads,
                engine_process=False,
            )
            backend = build_backend(settings)  # the server's engine, on a thread here
            drivers["direct"] = DirectDriver(backend)

        async def main() -> dict[str, dict[int, dict[str, Any]]]:
            try:
                pids = {mode: server.pid for mode, server in servers.items()}
                return await measure(drivers, args, pids)
            finally:
                for driver in drivers.values():
                    if isinstance(driver, HttpDriver):
                        await driver.close()
                if backend is not None:
                    await backend.close()

        return asyncio.run(main())
    finally:
        for server in servers.values():
            stop_server(server)


def overhead(http: dict[str, Any], direct: dict[str, Any]) -> dict[str, float]:
    """The server's share of TTFT: (HTTP - direct) / HTTP, at p50 and on the mean."""
    out = {}
    for stat in ("p50_ms", "mean_ms"):
        h, d = http["ttft"][stat], direct["ttft"][stat]
        out[f"ttft_{stat}_delta"] = h - d
        out[f"ttft_{stat.removesuffix('_ms')}_pct"] = 100 * (h - d) / h if h else 0.0
    return out


def markdown(report: dict[str, Any]) -> str:
    slo = report["config"]
    lines = [
        "# Serving benchmark (`bench/serve.py`)",
        "",
        f"{report['machine']}. {report['note']}",
        "",
        f"Workload: {slo['turns']} turns per user, {slo['max_tokens']} tokens per reply (greedy, "
        f"fixed length), a ~{slo['persona_chars']}-character persona shared by every user, "
        f"think time {slo['think_s']:g} s on average between turns (0: back to back). "
        f"Engine threads: {slo['threads']} (both modes). "
        f"SLO: TTFT < {slo['slo_ttft_ms']:.0f} ms and mean ITL < {slo['slo_itl_ms']:.0f} ms.",
        "",
        "| users | mode | TTFT p50/p95/p99 ms | ITL p50/p95/p99 ms | E2E p50/p95/p99 ms "
        "| goodput req/s | SLO met | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    modes = report["modes"]
    for level in report["levels"]:
        for mode in modes:
            m = level[mode]
            trio = [
                "/".join(f"{m[k][p]:.0f}" for p in ("p50_ms", "p95_ms", "p99_ms"))
                for k in ("ttft", "itl", "e2e")
            ]
            lines.append(
                f"| {level['concurrency']} | {mode} | {trio[0]} | {trio[1]} | {trio[2]} | "
                f"{m['goodput_rps']:.2f} | {100 * m['slo_attainment']:.0f}% | {m['num_errors']} |"
            )
    lines += ["", "Server overhead on TTFT, (HTTP - direct) / HTTP (target < 5% at 16 users):", ""]
    lines += [
        "| users | mode | p50 delta ms | p50 % | mean delta ms | mean % |",
        "|---|---|---|---|---|---|",
    ]
    for level in report["levels"]:
        for mode, o in level.get("overhead", {}).items():
            lines.append(
                f"| {level['concurrency']} | {mode} | {o['ttft_p50_ms_delta']:.1f} "
                f"| {o['ttft_p50_pct']:.1f} | {o['ttft_mean_ms_delta']:.1f} "
                f"| {o['ttft_mean_pct']:.1f} |"
            )
    lines += [
        "",
        "CPU per streamed token over HTTP, besides the engine's (us; 2 cores in all, so it "
        "slows the engine's steps):",
        "",
        "| users | mode | server process (the engine too when on its thread) "
        "| its event loop | load generator (this client) |",
        "|---|---|---|---|---|",
    ]
    for level in report["levels"]:
        for mode in modes:
            cpu = level[mode].get("cpu_us_per_token")
            if cpu:
                lines.append(
                    f"| {level['concurrency']} | {mode} | {cpu['server']:.0f} "
                    f"| {cpu['server_loop']:.0f} | {cpu['client']:.0f} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--turns", type=int, default=4, help="turns per user at each level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--think-s", type=float, default=1.0, help="mean think time between turns (0: none)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the modes")
    parser.add_argument("--threads", type=int, default=2, help="engine threads (both modes)")
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    parser.add_argument("--slo-itl-ms", type=float, default=200.0)
    parser.add_argument("--no-direct", action="store_true", help="skip the in-process peer")
    parser.add_argument(
        "--engine-process",
        nargs="+",
        choices=["auto", "true", "false"],
        default=["auto"],
        help="the server's TALKLOOP_ENGINE_PROCESS; several values: one server (mode) each",
    )
    parser.add_argument("--note", default="", help="e.g. 'shared machine, other jobs running'")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="talkloop-bench-serve-") as data_dir:
        modes = run(args, data_dir)
    levels = []
    for c in args.concurrency:
        level: dict[str, Any] = {"concurrency": c, **{m: modes[m][c] for m in modes}}
        if "direct" in modes:
            level["overhead"] = {
                m: overhead(modes[m][c], modes["direct"][c]) for m in modes if m != "direct"
            }
        levels.append(level)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "note": args.note or "Quiet machine assumed; pass --note to record otherwise.",
        "config": {**vars(args), "out": str(args.out), "persona_chars": len(PERSONA)},
        "modes": list(modes),
        "levels": levels,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
