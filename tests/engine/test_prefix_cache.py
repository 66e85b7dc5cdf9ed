"""Radix prefix cache: exact block reuse, eviction order, and output identical to no cache."""

from __future__ import annotations

import pytest
import torch

from talkloop.engine.block_manager import BlockManager
from talkloop.engine.config import SchedulerConfig
from talkloop.engine.prefix_cache import RadixCache
from talkloop.engine.scheduler import Scheduler
from talkloop.engine.sequence import Sequence
from tests.engine.tiny import (
    assert_no_leaked_blocks,
    greedy,
    reference_greedy,
    run_to_completion,
    tiny_config,
    tiny_engine,
    tiny_model,
)

MODEL = tiny_model(tiny_config("llama"), seed=21)
PERSONA = list(range(40, 70))  # 30 tokens: 7 full blocks of 4, shared by every "user"


def _run_one(engine, request_id, prompt, max_tokens=6):
    engine.add_request(request_id, prompt, greedy(max_tokens=max_tokens, ignore_eos=True))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.request_id == request_id]
    tokens = [t for o in outputs for d in o.deltas for t in d.token_ids]
    return tokens, outputs[-1].num_cached_tokens


def test_shared_persona_is_computed_once_and_blocks_are_reused() -> None:
    engine = tiny_engine(MODEL, num_blocks=64, block_size=4)
    _, cached_first = _run_one(engine, "u1", [*PERSONA, 1, 2, 3])
    persona_nodes = engine.block_manager.cache.match(PERSONA, max_blocks=99).nodes
    assert cached_first == 0 and len(persona_nodes) == 7
    tokens, cached_second = _run_one(engine, "u2", [*PERSONA, 9, 9])
    assert cached_second == 28  # 7 blocks x 4 tokens of the persona
    assert tokens == reference_greedy(MODEL, [*PERSONA, 9, 9], 6)
    again = engine.block_manager.cache.match(PERSONA, max_blocks=99).nodes
    assert [n.block_id for n in again] == [n.block_id for n in persona_nodes]
    assert engine.block_manager.cache.hit_rate == pytest.approx(28 / (33 + 32))
    assert_no_leaked_blocks(engine)


def test_next_turn_reuses_generated_tokens() -> None:
    engine = tiny_engine(MODEL, num_blocks=64, block_size=4)
    turn1 = [*PERSONA, 5, 6, 7]
    reply, _ = _run_one(engine, "t1", turn1, max_tokens=9)
    turn2 = [*turn1, *reply, 11, 12, 13]
    tokens, cached = _run_one(engine, "t2", turn2)
    # turn 1 computed 33 prompt + 8 generated tokens (the 9th was sampled, never computed)
    assert cached == (33 + 8) // 4 * 4
    assert tokens == reference_greedy(MODEL, turn2, 6)


def test_lru_eviction_order_is_exact() -> None:
    cache = RadixCache(block_size=2)
    manager = BlockManager(num_blocks=6, block_size=2, enable_prefix_cache=True)
    manager.cache = cache
    seqs = []
    for i, prompt in enumerate([[1, 2, 3, 4, 0], [5, 6, 7, 8, 0], [1, 2, 9, 9, 0]]):
        seq = Sequence(i, f"r{i}", 0, prompt, greedy())
        manager.match_prefix(seq)
        manager.allocate(seq, 4)
        seq.num_computed_tokens = 4
        manager.cache_full_blocks(seq)
        seqs.append(seq)
    # Third prompt shares block [1, 2] with the first.
    assert seqs[2].block_ids[0] == seqs[0].block_ids[0]
    blocks = {i: list(s.block_ids) for i, s in enumerate(seqs)}
    for seq in seqs:
        manager.free(seq)
    assert manager.num_free_blocks == 1 and cache.num_cached_blocks == 5
    # Touch the first prompt again: LRU leaves are now [5,6]->[7,8] then [1,2]->[9,9].
    cache.match([1, 2, 3, 4], max_blocks=2)
    assert cache.evict(2) == [blocks[1][1], blocks[1][0]]  # leaf [7,8], then its parent
    assert cache.evict(1) == [blocks[2][1]]  # [9,9]; [1,2] still has the child [3,4]
    assert cache.evict(2) == [blocks[0][1], blocks[0][0]]


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_output_with_cache_equals_without_through_eviction_and_preemption(
    prefix_cache: bool,
) -> None:
    g = torch.Generator().manual_seed(5)
    prompts = []
    for i in range(10):
        persona = PERSONA if i % 2 == 0 else list(range(100, 122))
        tail = torch.randint(0, 256, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g)
        prompts.append([*persona, *tail.tolist()])
    engine = tiny_engine(
        MODEL, num_blocks=30, block_size=4, max_num_batched_tokens=24, prefix_cache=prefix_cache
    )
    seqs = []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(max_tokens=14, ignore_eos=True))
        seqs += engine._requests[f"r{i}"]
    got = run_to_completion(engine)
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}:0"] == reference_greedy(MODEL, prompt, 14), f"r{i}"
    assert sum(s.num_preemptions for s in seqs) > 0
    if prefix_cache:
        assert sum(s.num_cached_tokens for s in seqs) > 0
    assert_no_leaked_blocks(engine)


def test_cache_aware_scheduling_prefers_cached_prefix_but_never_starves() -> None:
    manager = BlockManager(num_blocks=100, block_size=4, enable_prefix_cache=True)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, watermark_fraction=0, max_skips=2), manager)
    warm = Sequence(0, "warm", 0, [*PERSONA, 1], greedy())
    manager.match_prefix(warm)
    manager.allocate(warm, warm.num_tokens)
    warm.num_computed_tokens = warm.num_tokens
    manager.cache_full_blocks(warm)
    manager.free(warm)
    cold = Sequence(1, "cold", 0, list(range(200, 231)), greedy())
    sched.add(cold)
    hot = [Sequence(2 + i, f"hot{i}", 0, [*PERSONA, 2 + i], greedy()) for i in range(3)]
    for seq in hot:
        sched.add(seq)
    order = []
    for _ in range(4):
        out = sched.schedule()
        order.append(out.scheduled[0].seq.request_id)
        sched.finish(out.scheduled[0].seq)
    assert order == ["hot0", "hot1", "cold", "hot2"]  # cold admitted after 2 skips
