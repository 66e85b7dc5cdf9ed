"""Draft training: the shallow copy, the differentiable forward, and learning to agree."""

from __future__ import annotations

import torch

from talkloop.engine.config import SpeculativeConfig
from talkloop.engine.draft_model import DraftModelProposer
from talkloop.engine.draft_training import (
    DraftTrainingConfig,
    TrainingExample,
    causal_logits,
    generate_examples,
    measure_acceptance,
    shallow_draft,
    train_draft,
)
from talkloop.engine.models.weight_map import canonical_tensors
from tests.engine.tiny import full_logits, random_tensors, tiny_config, tiny_engine, tiny_model

CONFIG = tiny_config("qwen2", num_layers=3)
TARGET = tiny_model(CONFIG, seed=41)


def test_canonical_tensors_invert_loading() -> None:
    original = random_tensors(CONFIG, seed=41)
    got = canonical_tensors(TARGET)
    assert got.keys() == original.keys()
    for name, value in original.items():
        torch.testing.assert_close(got[name], value, msg=name)


def test_causal_forward_matches_the_paged_forward() -> None:
    tokens = list(range(30, 70))
    expected = full_logits(TARGET, tokens)
    got = causal_logits(TARGET, torch.tensor([tokens]))[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_shallow_draft_keeps_the_first_layers() -> None:
    draft = shallow_draft(TARGET, 1)
    assert draft.config.num_layers == 1
    torch.testing.assert_close(draft.layers[0].attn.qkv.weight, TARGET.layers[0].attn.qkv.weight)
    torch.testing.assert_close(draft.embed_tokens, TARGET.embed_tokens)


def test_training_raises_acceptance_of_the_targets_replies() -> None:
    engine = tiny_engine(TARGET, num_blocks=96, block_size=4, max_num_batched_tokens=64)
    engine.speculator.config = SpeculativeConfig(
        method="draft", draft_model="in-memory", max_batch_size=64
    )
    prompts = [[i, i + 1, i + 2, (i * 7) % 256] for i in range(0, 240, 8)]
    examples = generate_examples(engine, prompts, max_tokens=24)
    assert all(
        len(p) < len(e.token_ids) <= len(p) + 24 for e, p in zip(examples, prompts, strict=True)
    )
    draft = shallow_draft(TARGET, 1)

    def acceptance() -> float:
        engine.speculator.proposer = DraftModelProposer(
            draft, CONFIG.vocab_size, engine.block_manager
        )
        return measure_acceptance(engine, prompts[:8], max_tokens=24)

    before = acceptance()
    losses = train_draft(
        draft,
        examples,
        DraftTrainingConfig(num_layers=1, steps=60, batch_size=8, learning_rate=1e-3),
    )
    after = acceptance()
    print(f"loss {losses[0]:.2f} -> {losses[-1]:.2f}, acceptance {before:.2f} -> {after:.2f}")
    assert sum(losses[-5:]) < sum(losses[:5]) * 0.8
    assert after > before


def test_labels_cover_the_reply_only() -> None:
    from talkloop.engine.draft_training import _batch

    ids, labels = _batch([TrainingExample([5, 6, 7, 8, 9], 3)], max_len=16)
    assert ids.tolist() == [[5, 6, 7, 8, 9]]
    assert labels.tolist() == [[-100, -100, 8, 9, -100]]
