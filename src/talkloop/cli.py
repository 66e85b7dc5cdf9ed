"""The `talkloop` command: `chat` in the terminal, `generate` one prompt, `serve` the API.

The CLI is the one place that prints; the library logs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from talkloop.engine.config import CacheConfig, EngineConfig, SpeculativeConfig
from talkloop.engine.errors import EngineError
from talkloop.engine.llm_engine import LLMEngine
from talkloop.engine.loader import LoadedModel, build_engine, load_model
from talkloop.engine.outputs import RequestOutput
from talkloop.engine.sampling_params import SamplingParams


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", help="GGUF file or safetensors folder (default: bundled)")
    group.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    group.add_argument(
        "--quantization",
        choices=["none", "int8", "int4"],
        default="int4",
        help="quantization of linear layers (int4: +2.6%% perplexity on the bundled model, "
        "which itself is Q4_1, and the fastest decoding; int8: +1.0%%)",
    )
    group.add_argument("--device", default="cpu")
    group.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    group.add_argument("--max-model-len", type=int, help="context window to serve")
    group.add_argument(
        "--speculative",
        choices=["none", "ngram", "draft"],
        default="none",
        help="speculative decoding: n-gram prompt lookup, or a draft model (--draft-model)",
    )
    group.add_argument("--draft-model", help="draft model path (see `talkloop train-draft`)")
    group.add_argument("--kv-cache-mb", type=int, help="KV cache budget in MiB")


def _add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens)
    group.add_argument("--temperature", type=float, default=0.7)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--presence-penalty", type=float, default=0.0)
    group.add_argument("--frequency-penalty", type=float, default=0.0)
    group.add_argument("--seed", type=int)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--logit-bias", action="append", default=[], metavar="TOKEN_ID=BIAS")
    group.add_argument("--ignore-eos", action="store_true")


def _sampling_params(args: argparse.Namespace, **extra: Any) -> SamplingParams:
    bias: dict[int, float] = {}
    for item in args.logit_bias:
        token, _, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise EngineError(f"--logit-bias expects TOKEN_ID=BIAS, got {item!r}") from None
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        logit_bias=bias,
        ignore_eos=args.ignore_eos,
        **extra,
    )


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    kv_bytes = args.kv_cache_mb << 20 if args.kv_cache_mb else None
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        num_threads=args.threads,
        max_model_len=args.max_model_len,
        quantization=args.quantization if args.device == "cpu" else "none",
        cache=CacheConfig(kv_cache_bytes=kv_bytes),
        speculative=SpeculativeConfig(method=args.speculative, draft_model=args.draft_model),
    )


def _stream(
    engine: LLMEngine, prompt_ids: list[int], params: SamplingParams
) -> Iterator[RequestOutput]:
    request_id = f"cli-{time.monotonic_ns()}"
    engine.add_request(request_id, prompt_ids, params)
    try:
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.request_id == request_id:
                    yield output
    finally:
        engine.abort(request_id)


def _chat_prompt(loaded: LoadedModel, messages: list[dict[str, str]]) -> list[int]:
    text = loaded.chat_template.render(messages, add_generation_prompt=True)
    return loaded.tokenizer.encode(text, add_special_tokens=False)


def _print_stream(outputs: Iterator[RequestOutput], n: int = 1) -> list[str]:
    texts = [""] * n
    for output in outputs:
        if output.error:
            raise EngineError(output.error)
        for delta in output.deltas:
            texts[delta.index] += delta.text
            if n == 1:
                print(delta.text, end="", flush=True)
    return texts


def cmd_generate(args: argparse.Namespace) -> int:
    loaded = load_model(_engine_config(args))
    engine = build_engine(_engine_config(args), loaded)
    if args.raw:
        prompt_ids = loaded.tokenizer.encode(args.prompt)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt_ids = _chat_prompt(loaded, [*messages, {"role": "user", "content": args.prompt}])
    params = _sampling_params(args, n=args.n)
    texts = _print_stream(_stream(engine, prompt_ids, params), params.n)
    if params.n > 1:
        for i, text in enumerate(texts):
            print(f"--- choice {i} ---\n{text}")
    else:
        print()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from talkloop.server.logs import configure_logging
    from talkloop.server.serve import serve
    from talkloop.server.settings import Settings

    flags = {
        "config_file": args.config,
        "host": args.host,
        "port": args.port,
        "model": args.model,
        "dtype": args.dtype,
        "data_dir": args.data_dir,
        "dev_mode": args.dev or None,
    }
    settings = Settings(**{name: value for name, value in flags.items() if value is not None})
    configure_logging("debug" if args.verbose else settings.log_level, settings.log_format)

    def show_admin_key(secret: str) -> None:
        print(f"talkloop: created the admin API key (shown once, store it now):\n  {secret}")
        sys.stdout.flush()

    serve(settings, on_admin_key=show_admin_key)
    return 0


CHAT_HELP = "/reset clears the conversation, /system TEXT sets the system prompt, /quit exits"


def _chat_command(line: str, state: dict[str, Any]) -> bool:
    """Handle a /command; True if the line was one."""
    if line in ("/quit", "/exit"):
        raise EOFError
    if line == "/reset":
        state["history"] = []
        print("(conversation cleared)")
        return True
    if line.startswith("/system"):
        state["system"] = line[len("/system") :].strip() or None
        state["history"] = []
        print(f"(system prompt {'set' if state['system'] else 'cleared'}; conversation cleared)")
        return True
    if line.startswith("/"):
        print(CHAT_HELP)
        return True
    return False


def cmd_chat(args: argparse.Namespace) -> int:
    config = _engine_config(args)
    loaded = load_model(config)
    engine = build_engine(config, loaded)
    params = _sampling_params(args)
    state: dict[str, Any] = {"history": [], "system": args.system}
    print(f"talkloop chat: {loaded.path.name} ({loaded.load_seconds:.1f} s). {CHAT_HELP}")
    while True:
        try:
            line = input("\nyou> ").strip()
            if not line or _chat_command(line, state):
                continue
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        system = [{"role": "system", "content": state["system"]}] if state["system"] else []
        messages = [*system, *state["history"], {"role": "user", "content": line}]
        print("bot> ", end="", flush=True)
        try:
            reply = _print_stream(_stream(engine, _chat_prompt(loaded, messages), params))[0]
        except KeyboardInterrupt:
            print(" [interrupted]")
            continue
        print()
        state["history"] += [
            {"role": "user", "content": line},
            {"role": "assistant", "content": reply},
        ]


def cmd_train_draft(args: argparse.Namespace) -> int:
    from pathlib import Path

    from talkloop.engine.draft_training import DraftTrainingConfig
    from talkloop.train_draft import run

    training = DraftTrainingConfig(
        num_layers=args.layers,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )

    def progress(step: int, loss: float) -> None:
        if step % 10 == 0 or step == training.steps - 1:
            print(f"step {step + 1}/{training.steps}  loss {loss:.3f}", flush=True)

    report = run(
        Path(args.out),
        args.model,
        training,
        args.prompts,
        Path(args.conversations) if args.conversations else None,
        args.max_tokens,
        progress,
    )
    print(
        f"draft saved to {report.output}: acceptance {report.acceptance_before:.1%} -> "
        f"{report.acceptance_after:.1%} on {report.num_eval_prompts} held-out prompts "
        f"(generated {report.generate_seconds:.0f} s, trained {report.train_seconds:.0f} s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="talkloop", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat in the terminal, streaming tokens")
    chat.add_argument("--system", help="system prompt")
    _add_engine_args(chat)
    _add_sampling_args(chat, max_tokens=512)
    chat.set_defaults(func=cmd_chat)
    gen = sub.add_parser("generate", help="generate a reply to one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--system", help="system prompt")
    gen.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    gen.add_argument("-n", type=int, default=1, help="number of choices")
    _add_engine_args(gen)
    _add_sampling_args(gen, max_tokens=256)
    gen.set_defaults(func=cmd_generate)
    srv = sub.add_parser("serve", help="serve the OpenAI-compatible API (settings: TALKLOOP_*)")
    srv.add_argument("--config", help="TOML or JSON settings file")
    srv.add_argument("--host", help="bind address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="port (default 8000)")
    srv.add_argument("--model", help="GGUF file or safetensors folder (default: bundled)")
    srv.add_argument("--dtype", choices=["auto", "float32", "bfloat16"])
    srv.add_argument("--data-dir", help="database and files (default ./data or XDG)")
    srv.add_argument("--dev", action="store_true", help="dev mode: allow default secrets")
    srv.set_defaults(func=cmd_serve)
    draft = sub.add_parser("train-draft", help="train a speculative-decoding draft on CPU")
    draft.add_argument("--out", required=True, help="folder for the draft (safetensors)")
    draft.add_argument("--model", help="target model (default: bundled)")
    draft.add_argument("--conversations", help="JSONL conversation log ({'messages': [...]})")
    draft.add_argument("--prompts", type=int, default=320, help="prompts to learn from")
    draft.add_argument("--max-tokens", type=int, default=96, help="reply length per prompt")
    draft.add_argument("--layers", type=int, default=2, help="draft depth (target layers kept)")
    draft.add_argument("--steps", type=int, default=150)
    draft.add_argument("--batch-size", type=int, default=8)
    draft.add_argument("--learning-rate", type=float, default=3e-4)
    draft.add_argument("--seed", type=int, default=0)
    draft.set_defaults(func=cmd_train_draft)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.func(args))
    except (EngineError, ValueError) as exc:
        print(f"talkloop: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
