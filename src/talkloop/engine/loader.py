"""Build a ready engine from a path: weights, tokenizer, chat template, `LLMEngine`.

The only place that knows how the engine's parts fit together at start-up.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from talkloop.engine import cpu
from talkloop.engine.assets import default_model_path
from talkloop.engine.chat_template import ChatTemplate
from talkloop.engine.config import EngineConfig, SpeculativeConfig
from talkloop.engine.detokenizer import IncrementalDetokenizer
from talkloop.engine.draft_model import DraftModelProposer
from talkloop.engine.llm_engine import LLMEngine
from talkloop.engine.models.linear import channel_ranges, quantize_linears
from talkloop.engine.models.llama import LlamaForCausalLM
from talkloop.engine.output_processor import Detokenizer
from talkloop.engine.sampling_params import SamplingParams
from talkloop.engine.system import release_free_memory
from talkloop.engine.tokenizer import Tokenizer
from talkloop.engine.weights import load_checkpoint
from talkloop.engine.weights.gguf import read_gguf_metadata

if TYPE_CHECKING:
    from talkloop.engine.structured.grammar import GrammarCompiler

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    path: Path
    load_seconds: float


def model_path(config: EngineConfig) -> Path:
    return Path(config.model) if config.model else default_model_path()


def load_tokenizer(config: EngineConfig) -> Tokenizer:
    """Only the tokenizer of `config.model`: for a process that renders and tokenizes prompts
    while another one holds the weights (`engine_process.EngineProcess`)."""
    path = model_path(config)
    return _tokenizer_at(path, read_gguf_metadata(path) if path.is_file() else None)


def _tokenizer_at(path: Path, gguf_metadata: dict[str, Any] | None) -> Tokenizer:
    """A GGUF file's tokenizer from its metadata, else a Hugging Face folder's."""
    if path.is_file() and gguf_metadata is not None:
        return Tokenizer.from_gguf_metadata(gguf_metadata)
    return Tokenizer.from_folder(path)


def load_model(config: EngineConfig) -> LoadedModel:
    """Read weights and tokenizer from `config.model` (or the bundled model)."""
    start = time.perf_counter()
    path = model_path(config)
    checkpoint = load_checkpoint(path)
    tokenizer = _tokenizer_at(path, checkpoint.metadata)
    dtype = cpu.auto_dtype(config.device) if config.dtype == "auto" else config.dtype
    model = LlamaForCausalLM(checkpoint.config, dtype=DTYPES[dtype], device=config.device)
    model.load_weights(checkpoint.tensors)
    del checkpoint
    # the outlier channels serve only the W8A8 path, which runs only where int8 dot products do
    calibrated = config.quantization != "none" and cpu.has_int8_dot()
    ranges = calibrate(model, tokenizer) if calibrated else None
    quantize_linears(model, config.quantization, ranges=ranges)
    model.to(config.device).eval()
    release_free_memory()
    seconds = time.perf_counter() - start
    logger.info("loaded %s in %.2f s (%s, %s)", path, seconds, dtype, config.quantization)
    return LoadedModel(model, tokenizer, ChatTemplate.for_tokenizer(tokenizer), path, seconds)


CALIBRATION_TOKENS = 512


def calibrate(model: LlamaForCausalLM, tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """Each linear's input range per channel over the calibration text (chat, prose, notes,
    JSON, code), with the dense weights: picks the W8A8 path's outlier channels."""
    text = files("talkloop.engine").joinpath("data/calibration.txt").read_text("utf-8")
    ids = tokenizer.encode(text, add_special_tokens=False)[:CALIBRATION_TOKENS]

    def run() -> None:
        model.compute_logits(model.prefill(ids)[-16:])  # a few rows reach the lm_head

    return channel_ranges(model, run)


def build_engine(config: EngineConfig, loaded: LoadedModel | None = None) -> LLMEngine:
    loaded = loaded or load_model(config)
    tokenizer = loaded.tokenizer

    def detokenizer(params: SamplingParams, prompt_token_ids: list[int]) -> Detokenizer:
        return IncrementalDetokenizer(
            tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens
        )

    stop_ids = set(tokenizer.stop_token_ids) | set(loaded.model.config.eos_token_ids)

    def grammar_compiler() -> GrammarCompiler:
        from talkloop.engine.structured.grammar import GrammarCompiler

        return GrammarCompiler(tokenizer)

    engine = LLMEngine(loaded.model, config, detokenizer, sorted(stop_ids), grammar_compiler)
    spec = config.speculative
    if spec.method == "draft" and spec.draft_model:
        draft_config = replace(config, model=spec.draft_model, speculative=SpeculativeConfig())
        draft = load_model(draft_config).model
        engine.speculator.proposer = DraftModelProposer(
            draft, loaded.model.config.vocab_size, engine.block_manager, config.device
        )
    return engine
