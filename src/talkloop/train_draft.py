"""`talkloop train-draft`: train a speculative-decoding draft on chat traffic, on CPU.

Prompts come from conversation logs (JSONL of OpenAI-style `messages`) or, by default, from
the bundled characters talking with the human turns of the chitchat dataset. The target model
answers them (its own greedy replies are the training labels); a shallow copy of the target
learns them; acceptance is measured on held-out prompts before and after.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

from talkloop.characters.bundled import load_bundled_characters
from talkloop.engine.config import (
    EngineConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from talkloop.engine.draft_model import DraftModelProposer
from talkloop.engine.draft_training import (
    DraftTrainingConfig,
    generate_examples,
    measure_acceptance,
    shallow_draft,
    train_draft,
)
from talkloop.engine.loader import LoadedModel, build_engine, load_model
from talkloop.engine.models.weight_map import canonical_tensors
from talkloop.engine.weights import Checkpoint, save_safetensors_folder

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class DraftReport:
    num_train_prompts: int
    num_eval_prompts: int
    num_layers: int
    steps: int
    first_loss: float
    last_loss: float
    acceptance_before: float
    acceptance_after: float
    generate_seconds: float
    train_seconds: float
    output: str


def log_prompts(path: Path) -> Iterator[Messages]:
    """Each assistant turn of each logged conversation, as the messages that preceded it."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                messages = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(
                    f'{path}:{number}: expected {{"messages": [...]}}: {exc}'
                ) from None
            for i, message in enumerate(messages):
                if message.get("role") == "assistant" and i > 0:
                    yield messages[:i]


def _chitchat_utterances() -> list[str]:
    raw = json.loads(files("chitchat_dataset").joinpath("dataset.json").read_text("utf-8"))
    return [
        message["text"]
        for conversation in raw.values()
        for turn in conversation["messages"]
        for message in turn
        if 3 <= len(message["text"]) <= 200
    ]


def character_prompts(num: int, seed: int) -> list[Messages]:
    """Bundled characters answering human chit-chat lines (synthetic chat traffic)."""
    rng = random.Random(seed)
    utterances = _chitchat_utterances()
    characters = load_bundled_characters()
    prompts = []
    for _ in range(num):
        character = rng.choice(characters)
        system = f"You are {character.name}. {character.description[:600]}"
        prompts.append(
            [
                {"role": "system", "content": system},
                {"role": "user", "content": rng.choice(utterances)},
            ]
        )
    return prompts


def _tokenize(loaded: LoadedModel, prompts: list[Messages]) -> list[list[int]]:
    render = loaded.chat_template.render
    return [
        loaded.tokenizer.encode(render(m, add_generation_prompt=True), add_special_tokens=False)
        for m in prompts
    ]


def run(
    out_dir: Path,
    model: str | None,
    training: DraftTrainingConfig,
    num_prompts: int,
    conversations: Path | None,
    max_tokens: int,
    progress: Any = None,
) -> DraftReport:
    serving = EngineConfig(
        model=model,
        dtype="bfloat16",
        quantization="int4",
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048),
        speculative=SpeculativeConfig(method="draft", draft_model=str(out_dir), max_batch_size=64),
    )
    loaded = load_model(serving)
    prompts = (
        list(log_prompts(conversations))
        if conversations
        else character_prompts(num_prompts, training.seed)
    )
    random.Random(training.seed).shuffle(prompts)
    prompt_ids = _tokenize(loaded, prompts[:num_prompts])
    num_eval = max(8, len(prompt_ids) // 10)
    eval_ids, train_ids = prompt_ids[:num_eval], prompt_ids[num_eval:]
    # Replies for training come from the target alone (no draft exists yet).
    engine = build_engine(replace(serving, speculative=SpeculativeConfig()), loaded)

    started = time.perf_counter()
    examples = generate_examples(engine, train_ids, max_tokens)
    generate_seconds = time.perf_counter() - started

    target = load_model(EngineConfig(model=model, dtype="float32")).model
    draft = shallow_draft(target, training.num_layers)
    del target

    def acceptance() -> float:
        engine.speculator.config = serving.speculative
        engine.speculator.proposer = DraftModelProposer(
            draft, loaded.model.config.vocab_size, engine.block_manager
        )
        rate = measure_acceptance(engine, eval_ids, max_tokens)
        engine.speculator.config = SpeculativeConfig()
        return rate

    before = acceptance()
    started = time.perf_counter()
    losses = train_draft(draft, examples, training, progress)
    train_seconds = time.perf_counter() - started
    after = acceptance()

    save_draft(draft, loaded, out_dir)
    report = DraftReport(
        len(train_ids),
        len(eval_ids),
        training.num_layers,
        training.steps,
        losses[0] if losses else 0.0,
        losses[-1] if losses else 0.0,
        before,
        after,
        generate_seconds,
        train_seconds,
        str(out_dir),
    )
    (out_dir / "training_report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def save_draft(draft: Any, loaded: LoadedModel, out_dir: Path) -> None:
    """A folder `--draft-model` (or any HF loader) can read: weights, config, tokenizer."""
    checkpoint = Checkpoint(draft.config, canonical_tensors(draft), out_dir, {})
    save_safetensors_folder(checkpoint, out_dir, "bfloat16")
    loaded.tokenizer.save(out_dir)
