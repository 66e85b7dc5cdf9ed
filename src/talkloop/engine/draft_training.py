"""Train a speculative-decoding draft on chat traffic: a shallow copy of the target.

The draft starts as the target's embeddings, first `num_layers` layers, final norm and LM
head, then learns (cross-entropy on the target's own greedy replies, prompt tokens masked)
to predict what the target will say. Embeddings and head stay frozen (tied, and most of the
parameters); the layers and norms train. Runs on CPU in minutes for SmolLM2-135M.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from talkloop.engine.llm_engine import LLMEngine
from talkloop.engine.models.llama import LlamaForCausalLM
from talkloop.engine.models.rope import apply_rope
from talkloop.engine.models.weight_map import canonical_tensors
from talkloop.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftTrainingConfig:
    num_layers: int = 4
    steps: int = 200
    batch_size: int = 8
    max_seq_len: int = 384
    learning_rate: float = 3e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.steps < 0 or self.batch_size < 1:
            raise ValueError("num_layers and batch_size must be >= 1 and steps >= 0")


@dataclass(frozen=True)
class TrainingExample:
    token_ids: list[int]
    num_prompt_tokens: int  # loss only on the reply that follows


def shallow_draft(target: LlamaForCausalLM, num_layers: int) -> LlamaForCausalLM:
    """A float32 copy of the target's first `num_layers` layers with its embeddings and head."""
    if not 1 <= num_layers <= target.config.num_layers:
        raise ValueError(f"num_layers must be in 1..{target.config.num_layers}, got {num_layers}")
    tensors = canonical_tensors(target)
    config = replace(target.config, num_layers=num_layers)
    kept = {
        name: value
        for name, value in tensors.items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < num_layers
    }
    draft = LlamaForCausalLM(config, dtype=torch.float32)
    draft.load_weights(kept)
    return draft


def causal_logits(model: LlamaForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """Differentiable full-sequence forward: input_ids [B, T] -> logits [B, T, V]."""
    batch, length = input_ids.shape
    x = F.embedding(input_ids, model.embed_tokens)
    cos, sin = model.rope.tables(torch.arange(length), x.dtype)  # [T, 1, D]
    for layer in model.layers:
        attn = layer.attn
        heads = attn.qkv(layer.input_norm(x)).view(batch, length, -1, attn.head_dim)
        num_qk = attn.num_heads + attn.num_kv_heads
        qk = apply_rope(heads[:, :, :num_qk], cos, sin)
        q, k = qk.split([attn.num_heads, attn.num_kv_heads], dim=2)
        group = attn.num_heads // attn.num_kv_heads
        k = k.repeat_interleave(group, dim=2)
        v = heads[:, :, num_qk:].repeat_interleave(group, dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        x = x + layer.mlp(layer.post_attn_norm(x))
    return model.lm_head(model.norm(x))


def generate_examples(
    engine: LLMEngine, prompts: SequenceOf[list[int]], max_tokens: int = 96
) -> list[TrainingExample]:
    """The target's own greedy replies to `prompts` (what a draft must learn to guess)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"draft-data-{i}", prompt, params)
    replies: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            replies.setdefault(out.request_id, []).extend(out.deltas[0].token_ids)
    return [
        TrainingExample([*prompt, *replies.get(f"draft-data-{i}", [])], len(prompt))
        for i, prompt in enumerate(prompts)
    ]


def _batch(examples: list[TrainingExample], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and labels [B, T] (-100 where no loss)."""
    length = min(max_len, max(len(e.token_ids) for e in examples))
    ids = torch.zeros(len(examples), length, dtype=torch.int64)
    labels = torch.full((len(examples), length), -100, dtype=torch.int64)
    for row, example in enumerate(examples):
        tokens = example.token_ids[-length:]
        start = max(0, example.num_prompt_tokens - (len(example.token_ids) - len(tokens)))
        ids[row, : len(tokens)] = torch.tensor(tokens)
        # Position t predicts token t + 1: label the reply tokens only.
        targets = torch.tensor(tokens[1:])
        labels[row, : len(tokens) - 1] = targets
        labels[row, : max(0, start - 1)] = -100
    return ids, labels


def train_draft(
    draft: LlamaForCausalLM,
    examples: list[TrainingExample],
    config: DraftTrainingConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fine-tune the draft's layers in place; returns the loss per step."""
    if not examples:
        raise ValueError("no training examples")
    rng = random.Random(config.seed)
    trainable = [p for layer in draft.layers for p in layer.parameters()] + [draft.norm.weight]
    for param in trainable:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    losses = []
    for step in range(config.steps):
        ids, labels = _batch(
            rng.sample(examples, min(config.batch_size, len(examples))), config.max_seq_len
        )
        logits = causal_logits(draft, ids)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step, losses[-1])
    for param in trainable:
        param.requires_grad_(False)
    return losses


def measure_acceptance(
    engine: LLMEngine, prompts: SequenceOf[list[int]], max_tokens: int = 64
) -> float:
    """Draft acceptance rate of `engine`'s speculator on greedy replies to `prompts`."""
    before = (engine.speculator.num_draft_tokens, engine.speculator.num_accepted_tokens)
    started = time.perf_counter()
    generate_examples(engine, prompts, max_tokens)
    drafted = engine.speculator.num_draft_tokens - before[0]
    accepted = engine.speculator.num_accepted_tokens - before[1]
    logger.info("acceptance measured in %.1f s", time.perf_counter() - started)
    return accepted / drafted if drafted else 0.0
