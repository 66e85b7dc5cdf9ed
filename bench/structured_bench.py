"""Constrained-decoding benchmark: per-token overhead of a JSON Schema on the bundled tokenizer.

Each step of a batch of 1 and of 16 sequences: fill the grammar bitmasks, apply them to [N, V]
logits, advance every matcher by its next token. The token streams are the bundled tokenizer's
encodings of real JSON documents (memory-extraction facts) that satisfy the schema. Peers,
measured in the same run: the plain sampler on the same logits (`sample`, greedy and
temperature 0.8) and a decode step of the bundled model through `LLMEngine` at the same batch
size, back to back within each repeat. Each batch runs `--repeats` times; medians (of times and
of per-repeat ratios) are reported. Also: cold compile time, first-mask latency and matcher
start-up. Results: bench/results/structured.json.

    .venv/bin/python bench/structured_bench.py               # 5 repeats
    .venv/bin/python bench/structured_bench.py --repeats 3 --no-model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llguidance
import torch

from talkloop.engine.assets import default_model_path
from talkloop.engine.config import EngineConfig
from talkloop.engine.loader import LoadedModel, build_engine, load_model
from talkloop.engine.sampler import SamplingBatch, sample
from talkloop.engine.sampling_params import SamplingParams
from talkloop.engine.structured.bitmask import blocked_tokens, fill_bitmasks
from talkloop.engine.structured.grammar import GrammarCompiler
from talkloop.engine.structured.matcher import GrammarMatcher
from talkloop.engine.structured.spec import StructuredOutput
from talkloop.engine.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
THREADS = 2
BATCHES = (1, 16)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "speaker": {"type": "string", "maxLength": 40},
        "mood": {"enum": ["calm", "happy", "sad", "angry", "curious"]},
        "facts": {
            "type": "array",
            "maxItems": 6,
            "items": {
                "type": "object",
                "properties": {
                    "subject": {"type": "string"},
                    "fact": {"type": "string"},
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                    "permanent": {"type": "boolean"},
                },
                "required": ["subject", "fact", "confidence", "permanent"],
                "additionalProperties": False,
            },
        },
        "turn": {"type": "integer", "minimum": 0},
    },
    "required": ["speaker", "mood", "facts", "turn"],
    "additionalProperties": False,
}

NAMES = ["Corvo", "Fenn", "Poppy", "Vellum", "Hush", "Mara", "Isolde", "Tomas"]
FACTS = [
    "keeps a lighthouse ledger of every ship that passes the bay",
    "is afraid of deep water but swims every morning anyway",
    "grew up in the fishing village across the harbour",
    "collects sea glass in a jar beside the window",
    "owes the baker three silver coins since the winter storm",
    "once heard the fog horn answer back in the night",
]


def documents(num_docs: int) -> list[str]:
    """Compact JSON documents that satisfy SCHEMA (a few facts each)."""
    docs = []
    for i in range(num_docs):
        facts = [
            {
                "subject": NAMES[(i + k) % len(NAMES)],
                "fact": FACTS[(i + 2 * k) % len(FACTS)],
                "confidence": round(0.55 + 0.07 * k, 2),
                "permanent": k % 2 == 0,
            }
            for k in range(3 + i % 3)
        ]
        doc = {"speaker": NAMES[i % len(NAMES)], "mood": "curious", "facts": facts, "turn": 7 + i}
        docs.append(json.dumps(doc))
    return docs


def token_streams(tokenizer: Tokenizer, compiler: GrammarCompiler, num: int) -> list[list[int]]:
    spec = StructuredOutput.from_json_schema(SCHEMA)
    streams = [tokenizer.encode(d, add_special_tokens=False) for d in documents(num)]
    for stream in streams:
        if compiler.matcher(spec).count_valid(stream) != len(stream):
            raise RuntimeError("a benchmark document does not satisfy the schema")
    return streams


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def structured_run(compiler: GrammarCompiler, streams: list[list[int]]) -> dict[str, float]:
    """One pass over the streams; microseconds per step of each part and in all.

    fill + apply is what `apply_grammar_masks` does; advance is the engine's part after sampling.
    """
    spec = StructuredOutput.from_json_schema(SCHEMA)
    matchers = [compiler.matcher(spec) for _ in streams]
    num_steps = min(len(s) for s in streams)
    logits = torch.randn(len(streams), compiler.vocab_size)
    fill_s = apply_s = advance_s = 0.0
    for step in range(num_steps):
        start = time.perf_counter()
        bitmask = fill_bitmasks(matchers, compiler.executor)
        filled = time.perf_counter()
        _apply(logits, bitmask, compiler)
        applied = time.perf_counter()
        _advance(matchers, streams, step)
        fill_s += filled - start
        apply_s += applied - filled
        advance_s += time.perf_counter() - applied
    per_step = 1e6 / num_steps
    step_us = (fill_s + apply_s + advance_s) * per_step
    return {
        "fill_us_per_step": fill_s * per_step,
        "apply_us_per_step": apply_s * per_step,
        "advance_us_per_step": advance_s * per_step,
        "step_us": step_us,
        "us_per_token": step_us / len(streams),
        "num_steps": num_steps,
    }


def _apply(logits: torch.Tensor, bitmask: torch.Tensor, compiler: GrammarCompiler) -> None:
    blocked = blocked_tokens(bitmask, compiler.vocab_size, logits.shape[1], compiler.eos_token_ids)
    logits.masked_fill_(blocked, float("-inf"))


def _advance(matchers: list[GrammarMatcher], streams: list[list[int]], step: int) -> None:
    for matcher, stream in zip(matchers, streams, strict=True):
        matcher.advance(stream[step])


def sampler_run(vocab_size: int, batch: int, temperature: float) -> float:
    """Microseconds per `sample()` call on [batch, V] logits (the sampler this plugs into)."""
    logits = torch.randn(batch, vocab_size)
    params = SamplingBatch(
        temperatures=torch.full((batch,), temperature),
        top_ks=torch.zeros(batch, dtype=torch.int64),
        top_ps=torch.ones(batch),
        min_ps=torch.zeros(batch),
        repetition_penalties=torch.ones(batch),
        presence_penalties=torch.zeros(batch),
        frequency_penalties=torch.zeros(batch),
        prompt_token_ids=None,
        output_token_ids=None,
        bias_rows=None,
        bias_token_ids=None,
        bias_values=None,
        generators=(None,) * batch,
        max_num_logprobs=None,
    )
    sample(logits, params)  # warm-up
    num_calls = 50
    return 1e6 * _timed(lambda: [sample(logits, params) for _ in range(num_calls)]) / num_calls


def model_decode_run(loaded: LoadedModel, batch: int, num_steps: int = 24) -> float:
    """Microseconds per decode step of the bundled model through `LLMEngine` (bf16)."""
    engine = build_engine(EngineConfig(dtype="bfloat16", num_threads=THREADS), loaded)
    params = SamplingParams(max_tokens=num_steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", [1, 504, 3458, 282, 260, 1150 + i, 30], params)
    for _ in range(8):  # prefill and warm-up
        engine.step()
    elapsed = _timed(lambda: [engine.step() for _ in range(num_steps)])
    return 1e6 * elapsed / num_steps


def startup(tokenizer: Tokenizer) -> dict[str, float]:
    """Seconds to build the compiler; milliseconds to compile, start a matcher, first mask."""
    start = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, num_threads=THREADS)
    built = time.perf_counter() - start
    spec = StructuredOutput.from_json_schema(SCHEMA)
    compile_s = _timed(lambda: compiler.compile(spec))
    matcher = compiler.matcher(spec)
    first_mask_s = _timed(lambda: matcher.allowed_mask())
    new_matcher_s = _timed(lambda: [compiler.matcher(spec) for _ in range(100)]) / 100
    return {
        "compiler_build_s": built,
        "compile_ms": 1e3 * compile_s,
        "first_mask_ms": 1e3 * first_mask_s,
        "cached_matcher_us": 1e6 * new_matcher_s,
    }


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def repeat_once(
    compiler: GrammarCompiler, streams: list[list[int]], loaded: LoadedModel | None
) -> dict[str, float]:
    """Structured overhead and its peers back to back, so each ratio shares the machine's load."""
    row = structured_run(compiler, streams)
    batch = len(streams)
    row["sampler_greedy_us"] = sampler_run(compiler.vocab_size, batch, 0.0)
    row["sampler_t08_us"] = sampler_run(compiler.vocab_size, batch, 0.8)
    row["vs_sampler_t08"] = row["step_us"] / row["sampler_t08_us"]
    if loaded is not None:
        row["model_decode_step_us"] = model_decode_run(loaded, batch)
        row["vs_model_decode_step"] = row["step_us"] / row["model_decode_step_us"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-model", action="store_true", help="skip the model decode peer")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.set_flush_denormal(True)
    tokenizer = Tokenizer.from_gguf(default_model_path())
    result: dict[str, Any] = {
        "machine": platform.machine(),
        "threads": THREADS,
        "torch": torch.__version__,
        "llguidance": llguidance.__version__,
        "vocab_size": tokenizer.vocab_size,
        "repeats": args.repeats,
        "load_average_1m_start": os.getloadavg()[0],  # the machine is shared: read with care
        "startup": _median([startup(tokenizer) for _ in range(args.repeats)]),
        "batches": {},
    }
    compiler = GrammarCompiler(tokenizer, num_threads=THREADS)
    loaded = None if args.no_model else load_model(EngineConfig(dtype="bfloat16"))
    for batch in BATCHES:
        streams = token_streams(tokenizer, compiler, batch)
        structured_run(compiler, streams)  # warm-up: lexer states are built lazily
        runs = [repeat_once(compiler, streams, loaded) for _ in range(args.repeats)]
        row = _median(runs)
        row["min_us_per_token"] = min(r["us_per_token"] for r in runs)
        result["batches"][str(batch)] = row
        print(f"batch {batch}: " + ", ".join(f"{k}={v:.3g}" for k, v in row.items()))
    result["load_average_1m_end"] = os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "structured.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["startup"]))


if __name__ == "__main__":
    main()
