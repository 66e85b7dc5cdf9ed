"""Engine benchmark: prefill, single-stream decode, batched decode, peak RSS, vs peers.

Peers, each measured in its own process in the same run on the same GGUF:
  talkloop      the built-in engine (`--dtype auto`: bf16 where the CPU computes it natively,
                float32 elsewhere, as `talkloop serve` does)
  llamacpp      llama-cpp-python, same GGUF, 2 threads (installed from a cached wheel)
  transformers  fp32 eager on the same dequantized weights
Each (peer, task) runs `--repeats` times; the median is reported, and every figure is also a
ratio against the peers of the same run. Results: bench/results/engine.json and engine.md.

    .venv/bin/python bench/engine_bench.py            # all peers, 3 repeats
    .venv/bin/python bench/engine_bench.py --peers talkloop --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WHEEL_DIR = Path.home() / ".cache" / "talkloop-bench" / "wheels"
THREADS = 2
PREFILL_TOKENS = 1024
DECODE_TOKENS = 128
BATCH_DECODE_TOKENS = 64
TASKS = ("prefill", "decode", "batch8", "batch32", "batch16_ctx1k")
# batch16_ctx1k: 16 chats over ~1k-token contexts (a shared 768-token persona prefix and 256
# tokens of their own), the shape of character-chat traffic; tok/s of the decode phase alone.
LONG_PREFIX_TOKENS, LONG_OWN_TOKENS = 768, 256

TEXT = (
    "The lighthouse keeper counted the ships each evening and wrote their names in a ledger "
    "that smelled of salt and candle wax. Some nights the fog rolled in so thick that only "
    "the horn could speak for him, a low note that travelled across the bay to the fishing "
    "village where children pretended it was a whale calling home. "
)


def prompt_ids(tokenizer: Any, num_tokens: int, salt: int = 0) -> list[int]:
    ids: list[int] = []
    i = salt
    while len(ids) < num_tokens:
        ids += tokenizer.encode(f"Chapter {i}. {TEXT}", add_special_tokens=False)
        i += 1
    return ids[:num_tokens]


# ---- talkloop -------------------------------------------------------------------------------
QUANTIZATION = {"talkloop": "int8", "talkloop_int4": "int4", "talkloop_bf16": "none"}


def run_talkloop(task: str, dtype: str, quantization: str = "int8") -> dict[str, float]:
    from talkloop.engine.config import EngineConfig, SchedulerConfig
    from talkloop.engine.loader import build_engine, load_model
    from talkloop.engine.sampling_params import SamplingParams

    config = EngineConfig(
        dtype=dtype,
        quantization=quantization,
        num_threads=THREADS,
        scheduler=SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=64),
    )
    loaded = load_model(config)
    engine = build_engine(config, loaded)
    tok = loaded.tokenizer
    warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.add_request("warmup", prompt_ids(tok, 64, salt=99), warm)  # not a prefix of tasks
    while engine.has_unfinished_requests():
        engine.step()
    result: dict[str, float] = {"load_s": loaded.load_seconds}
    if task == "prefill":
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        engine.add_request("p", prompt_ids(tok, PREFILL_TOKENS), params)
        while engine.has_unfinished_requests():
            engine.step()
        result["tok_s"] = PREFILL_TOKENS / (time.perf_counter() - start)
        return result
    num = {"decode": 1, "batch8": 8, "batch32": 32, "batch16_ctx1k": 16}[task]
    max_tokens = DECODE_TOKENS if num == 1 else BATCH_DECODE_TOKENS
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    prompts = [prompt_ids(tok, 32, salt=i) for i in range(num)]
    if task == "batch16_ctx1k":
        prompts = long_context_prompts(tok, num)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    first: float | None = None
    start = time.perf_counter()
    generated = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            generated += sum(len(d.token_ids) for d in out.deltas)
        if first is None and generated >= num:
            first, generated_at_first = time.perf_counter(), generated
    end = time.perf_counter()
    if num == 1 or task == "batch16_ctx1k":  # decode phase: after every request's first token
        result["tok_s"] = (generated - generated_at_first) / (end - first)
    else:
        result["tok_s"] = generated / (end - start)  # end-to-end aggregate incl. prefill
    return result


def long_context_prompts(tokenizer: Any, num: int) -> list[list[int]]:
    prefix = prompt_ids(tokenizer, LONG_PREFIX_TOKENS, salt=1000)[:LONG_PREFIX_TOKENS]
    return [
        prefix + prompt_ids(tokenizer, LONG_OWN_TOKENS, salt=i)[:LONG_OWN_TOKENS]
        for i in range(num)
    ]


# ---- llama.cpp --------------------------------------------------------------------------------
def ensure_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401

        return
    except ImportError:
        pass
    WHEEL_DIR.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    if not list(WHEEL_DIR.glob("llama_cpp_python-*.whl")):
        print("building llama-cpp-python once (about 9 minutes)...", file=sys.stderr)
        subprocess.run(
            [*pip[:-2], "wheel", "--no-deps", "-w", str(WHEEL_DIR), "llama-cpp-python"], check=True
        )
    subprocess.run([*pip, "--find-links", str(WHEEL_DIR), "llama-cpp-python"], check=True)


def run_llamacpp(task: str) -> dict[str, float]:
    import llama_cpp

    from talkloop.engine.assets import default_model_path
    from talkloop.engine.tokenizer import Tokenizer

    path = str(default_model_path())
    tok = Tokenizer.from_gguf(path)
    start = time.perf_counter()
    llm = llama_cpp.Llama(
        path, n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS, n_batch=512, verbose=False
    )
    result: dict[str, float] = {"load_s": time.perf_counter() - start}
    llm.eval(prompt_ids(tok, 64))
    llm.reset()
    if task == "prefill":
        ids = prompt_ids(tok, PREFILL_TOKENS)
        start = time.perf_counter()
        llm.eval(ids)
        result["tok_s"] = PREFILL_TOKENS / (time.perf_counter() - start)
        return result
    if task != "decode":
        raise ValueError("llama-cpp-python serves one sequence; batched tasks are not run")
    eos = tok.eos_token_id
    times = []
    stream = llm.create_completion(
        prompt_ids(tok, 32),
        max_tokens=DECODE_TOKENS,
        temperature=0.0,
        stream=True,
        logit_bias={eos: -100.0} if eos is not None else None,
    )
    for _ in stream:
        times.append(time.perf_counter())
    result["tok_s"] = (len(times) - 1) / (times[-1] - times[0])
    return result


# ---- transformers -----------------------------------------------------------------------------
def run_transformers(task: str) -> dict[str, float]:
    import torch
    import transformers

    from talkloop.engine.assets import default_model_path
    from talkloop.engine.tokenizer import Tokenizer
    from talkloop.engine.weights import load_checkpoint
    from talkloop.engine.weights.safetensors_folder import save_safetensors_folder

    torch.set_num_threads(THREADS)
    torch.set_flush_denormal(True)
    folder = ROOT / "bench" / ".cache" / "smollm2-f32"
    start = time.perf_counter()
    if not (folder / "config.json").exists():
        save_safetensors_folder(load_checkpoint(default_model_path()), folder, "float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    result: dict[str, float] = {"load_s": time.perf_counter() - start}
    tok = Tokenizer.from_gguf(default_model_path())
    if task == "prefill":
        ids = torch.tensor([prompt_ids(tok, PREFILL_TOKENS)])
        with torch.inference_mode():
            model(ids[:, :64])
            start = time.perf_counter()
            model(ids)
        result["tok_s"] = PREFILL_TOKENS / (time.perf_counter() - start)
        return result
    num = {"decode": 1, "batch8": 8, "batch32": 32, "batch16_ctx1k": 16}[task]
    max_tokens = DECODE_TOKENS if num == 1 else BATCH_DECODE_TOKENS
    if task == "batch16_ctx1k":
        ids = torch.tensor(long_context_prompts(tok, num))
    else:
        ids = torch.tensor([prompt_ids(tok, 32, salt=i) for i in range(num)])
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=2, do_sample=False)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        total = time.perf_counter() - start
    if num == 1:
        result["tok_s"] = (max_tokens - 1) / (total - first)
    elif task == "batch16_ctx1k":  # decode phase, as for talkloop
        result["tok_s"] = num * (max_tokens - 1) / (total - first)
    else:
        result["tok_s"] = num * max_tokens / total
    return result


# ---- orchestration ---------------------------------------------------------------------------
def worker(peer: str, task: str, dtype: str) -> None:
    runners = {
        **{name: (lambda q=q: run_talkloop(task, dtype, q)) for name, q in QUANTIZATION.items()},
        "llamacpp": lambda: run_llamacpp(task),
        "transformers": lambda: run_transformers(task),
    }
    result = runners[peer]()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(peer: str, task: str, dtype: str, repeats: int) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", peer, task, "--dtype", dtype],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
        )
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1:]}
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    keys = runs[0].keys()
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {
        "runs_tok_s": [round(r["tok_s"], 1) for r in runs]
    }


def ratios(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
    def tok_s(peer: str, task: str) -> float | None:
        value = results.get(peer, {}).get(task, {}).get("tok_s")
        return float(value) if value else None

    out: dict[str, float] = {}
    for variant in QUANTIZATION:
        for task in TASKS:
            ours = tok_s(variant, task)
            for peer in ("llamacpp", "transformers"):
                theirs = tok_s(peer, task)
                if ours and theirs:
                    out[f"{variant}_{task}_vs_{peer}"] = round(ours / theirs, 3)
        llama_decode = tok_s("llamacpp", "decode")
        ours32 = tok_s(variant, "batch32")
        if llama_decode and ours32:
            out[f"{variant}_batch32_vs_llamacpp_single_stream"] = round(ours32 / llama_decode, 3)
    return out


def auto_dtype() -> str:
    from talkloop.engine import cpu

    return cpu.auto_dtype("cpu")


def cpu_description() -> str:
    """The CPU's model name and the features the engine's kernels choose by."""
    from talkloop.engine import cpu  # here: a llama.cpp worker must not import torch

    name = next(
        (
            line.partition(":")[2].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16")
    features = [flag for flag in wanted if flag in cpu.cpu_flags()]
    return f"{name} ({', '.join(features) or 'no AVX2'})"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    lines = [
        f"# Engine benchmark ({report['date']}, {report['machine']})",
        "",
        f"CPU: {report.get('cpu', 'not recorded')}.",
        "",
        f"SmolLM2-135M-Instruct Q4_1, {THREADS} threads, talkloop dtype {report['dtype']}, "
        f"median of {report['repeats']} runs (tok/s).",
        "",
        "| task | " + " | ".join(report["results"]) + " |",
        "|---|" + "---|" * len(report["results"]),
    ]
    for task in TASKS:
        cells = []
        for peer in report["results"]:
            r = report["results"][peer].get(task, {})
            cells.append(f"{r['tok_s']:.1f}" if "tok_s" in r else "n/a")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "Peak RSS (MB, batch32 for talkloop/transformers, decode for llama.cpp):", ""]
    for peer, tasks in report["results"].items():
        rss = tasks.get("batch32", tasks.get("decode", {})).get("peak_rss_mb")
        if rss:
            lines.append(f"- {peer}: {rss:.0f}")
    lines += ["", "Model load time (s, median, prefill task):", ""]
    for peer, tasks in report["results"].items():
        load = tasks.get("prefill", {}).get("load_s")
        if load:
            lines.append(f"- {peer}: {load:.2f}")
    lines += ["", "Ratios (talkloop / peer):", ""]
    lines += [f"- {k}: {v}" for k, v in report["ratios"].items()]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--worker", nargs=2, metavar=("PEER", "TASK"))
    parser.add_argument("--peers", default="talkloop,talkloop_int4,llamacpp,transformers")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "engine"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.dtype)
        return
    peers = args.peers.split(",")
    if "llamacpp" in peers:
        ensure_llama_cpp()
    results: dict[str, dict[str, Any]] = {}
    for peer in peers:
        for task in args.tasks.split(","):
            if peer == "llamacpp" and task.startswith("batch"):
                continue
            print(f"{peer} {task}...", file=sys.stderr, flush=True)
            results.setdefault(peer, {})[task] = measure(peer, task, args.dtype, args.repeats)
            print(f"  {results[peer][task]}", file=sys.stderr, flush=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "cpu": cpu_description(),
        "dtype": args.dtype if args.dtype != "auto" else f"auto ({auto_dtype()})",
        "repeats": args.repeats,
        "results": results,
        "ratios": ratios(results),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, Path(args.out + ".md"))
    print(json.dumps(report["ratios"], indent=2))


if __name__ == "__main__":
    main()
