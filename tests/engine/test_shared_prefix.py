"""Shared-prefix (cascade) decode attention: which rows group, exact attention, same output."""

from __future__ import annotations

import torch

from talkloop.engine.attention import AttentionMetadata, KVCache, SharedPrefix, paged_attention
from talkloop.engine.shared_prefix import MIN_NATIVE_MEMBERS, SharedGroup, shared_prefix_groups
from tests.engine.tiny import (
    assert_no_leaked_blocks,
    greedy,
    reference_greedy,
    run_to_completion,
    tiny_config,
    tiny_engine,
    tiny_model,
)


def test_groups_follow_the_shared_blocks() -> None:
    persona = [10, 11, 12, 13, 14]
    tables = [
        [*persona, 20, 21],  # three chats on one persona
        [*persona, 30],
        [*persona, 40, 41, 42],
        [50, 51, 52, 53, 54, 55],  # alone on another persona
        [60, 61, 62, 63, 64, 70],  # two on a third, sharing 5 blocks
        [60, 61, 62, 63, 64, 80],
    ]
    shareable = [len(t) - 1 for t in tables]
    assert shared_prefix_groups(tables, shareable) == [
        SharedGroup((0, 1, 2), 5),
        SharedGroup((4, 5), 5),
    ]


def test_split_only_when_deeper_groups_save_more_reads() -> None:
    header = [1, 2, 3, 4]  # a short header every character's prompt starts with
    a = [*header, 10, 11, 12, 13, 14, 15]
    b = [*header, 20, 21, 22, 23, 24, 25]
    tables = [[*a, 100], [*a, 101], [*b, 102], [*b, 103]]
    shareable = [len(t) - 1 for t in tables]
    # Sharing the header across all four saves 3 x 4 reads; per persona, 2 x (1 x 10).
    assert shared_prefix_groups(tables, shareable) == [
        SharedGroup((0, 1), 10),
        SharedGroup((2, 3), 10),
    ]
    # A row may not share the block its newest token goes to, nor groups below the minimum.
    assert shared_prefix_groups([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]], [5, 5], min_blocks=4) == [
        SharedGroup((0, 1), 5)
    ]
    assert shared_prefix_groups([[1, 2, 3, 9], [1, 2, 3, 8]], [3, 3], min_blocks=4) == []
    assert shared_prefix_groups([[1, 2, 3, 4, 5]], [4]) == []


def test_groups_below_min_members_are_not_formed() -> None:
    persona = [10, 11, 12, 13, 14]
    tables = [[*persona, 20 + i] for i in range(4)] + [[10, 11, 90, 91, 92, 93]]
    shareable = [len(t) - 1 for t in tables]
    expected = [SharedGroup((0, 1, 2, 3), 5)]  # the fifth shares 2 blocks: below min_blocks
    assert shared_prefix_groups(tables, shareable) == expected
    assert shared_prefix_groups(tables, shareable, min_members=4) == expected
    assert shared_prefix_groups(tables, shareable, min_members=5) == []


def _decode_meta(tables: list[list[int]], lens: list[int], block_size: int, shared=()):
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    lens_t = torch.tensor(lens)
    beyond = torch.arange(width * block_size).unsqueeze(0) >= lens_t.unsqueeze(1)
    bias = torch.zeros(beyond.shape).masked_fill_(beyond, float("-inf"))
    slots = torch.tensor([t[(n - 1) // block_size] * block_size + (n - 1) % block_size
                          for t, n in zip(tables, lens, strict=True)])  # fmt: skip
    return AttentionMetadata(slots, (), 0, padded, lens_t, bias, tuple(shared))


def test_cascade_attention_equals_attention_over_whole_contexts() -> None:
    torch.manual_seed(0)
    block_size, kv_heads, heads, dim = 4, 2, 6, 8
    cache = KVCache(1, 40, block_size, kv_heads, dim, torch.float32, "cpu")
    cache.keys[0].normal_()
    cache.values[0].normal_()
    persona = [3, 7, 1, 9, 12]  # 20 tokens, scattered blocks
    tables = [[*persona, 20, 21], [*persona, 22], [30, 31], [*persona, 23, 24, 25]]
    lens = [27, 22, 6, 31]
    q = torch.randn(4, heads, dim)
    k, v = torch.randn(4, kv_heads, dim), torch.randn(4, kv_heads, dim)
    whole = _decode_meta(tables, lens, block_size)
    expected = paged_attention(q, k, v, cache.keys[0], cache.values[0], whole, 0.3)

    members = [0, 1, 3]
    own = [t[len(persona) :] if i in members else t for i, t in enumerate(tables)]
    own_lens = [n - 20 if i in members else n for i, n in enumerate(lens)]
    group = SharedPrefix(torch.tensor(members), torch.tensor(persona))
    cascade = _decode_meta(own, own_lens, block_size, [group])
    got = paged_attention(q, k, v, cache.keys[0], cache.values[0], cascade, 0.3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_users_on_one_persona_decode_exactly_with_the_shared_path() -> None:
    model = tiny_model(tiny_config("llama"), seed=5)
    engine = tiny_engine(model, num_blocks=128, block_size=4, max_num_batched_tokens=64)
    runner = engine.runner
    runner.decode_plan = None  # the native step takes decode-only steps of up to 64 rows
    groups_seen: list[int] = []
    original = runner._decode_metadata

    def recording(decodes):
        meta = original(decodes)
        groups_seen.append(len(meta["decode_shared"]))
        return meta

    runner._decode_metadata = recording
    persona = list(range(40, 72))  # 8 full blocks
    # Enough users for a group with or without the native kernel (which wants >= 10).
    prompts = [[*persona, 100 + i, 5, 6 + i] for i in range(MIN_NATIVE_MEMBERS + 2)]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"u{i}", prompt, greedy(max_tokens=10, ignore_eos=True))
    tokens = run_to_completion(engine)
    assert max(groups_seen) >= 1  # the shared path ran
    for i, prompt in enumerate(prompts):
        assert tokens[f"u{i}:0"] == reference_greedy(model, prompt, 10)
    assert_no_leaked_blocks(engine)
