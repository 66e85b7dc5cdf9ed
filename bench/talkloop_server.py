"""Serve talkloop's OpenAI-compatible app for the chat-trace bench, with int4 weights.

What `talkloop serve` runs (`create_app` under uvicorn), but with an engine the CLI cannot
configure yet: weight-only int4, a bigger prefill budget per step, optional n-gram
speculation, and a fixed dev-mode key. Loopback only; the data directory is a throw-away
folder the bench passes in.

    .venv/bin/python bench/talkloop_server.py --port 8100 --data-dir /tmp/x --api-key KEY
"""

from __future__ import annotations

import argparse

import uvicorn

from talkloop.backends.engine_backend import EngineBackend
from talkloop.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from talkloop.server.app import create_app
from talkloop.server.settings import Settings

SERVED_MODEL_NAME = "smollm2"


def engine_config(args: argparse.Namespace) -> EngineConfig:
    extra = {}
    if args.speculative != "none":  # NOTE: only engines that have speculative decoding
        from talkloop.engine.config import SpeculativeConfig

        extra["speculative"] = SpeculativeConfig(method=args.speculative)
    return EngineConfig(
        dtype="bfloat16",
        quantization=args.quantization,
        num_threads=args.threads,
        max_model_len=args.max_model_len,
        cache=CacheConfig(enable_prefix_cache=True),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=args.max_batched_tokens),
        **extra,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-batched-tokens", type=int, default=2048)
    parser.add_argument("--quantization", default="int4", choices=["none", "int8", "int4"])
    parser.add_argument("--speculative", default="none", help="none or ngram")
    args = parser.parse_args()
    settings = Settings(
        host="127.0.0.1",
        port=args.port,
        data_dir=args.data_dir,
        dev_mode=True,
        admin_key=args.api_key,
        served_model_name=SERVED_MODEL_NAME,
        load_bundled_characters=False,
        num_threads=args.threads,
        max_model_len=args.max_model_len,
    )
    backend = EngineBackend.from_config(engine_config(args), SERVED_MODEL_NAME)
    app = create_app(settings, backend)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=args.port, log_config=None, access_log=False
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
