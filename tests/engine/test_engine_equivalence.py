"""Batched, paged, chunked and preempted greedy decoding == a naive one-sequence reference."""

from __future__ import annotations

import pytest
import torch

from tests.engine.tiny import (
    assert_no_leaked_blocks,
    greedy,
    reference_greedy,
    run_to_completion,
    tiny_config,
    tiny_engine,
    tiny_model,
)


def _prompts(num: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (num,), generator=g).tolist()
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mixtral"])
def test_concurrent_greedy_matches_reference(kind: str) -> None:
    model = tiny_model(tiny_config(kind), seed=3)
    prompts = _prompts(12, seed=4)
    # Small blocks, a small token budget (chunked prefill mixed with decode) and a pool too
    # small for everyone at once (preemption by recompute).
    engine = tiny_engine(model, num_blocks=40, block_size=4, max_num_batched_tokens=24)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(max_tokens=20, ignore_eos=True))
    got = run_to_completion(engine)
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}:0"] == reference_greedy(model, prompt, 20)[:20], f"request r{i}"
    assert_no_leaked_blocks(engine)


def test_preemption_happens_and_output_is_unchanged() -> None:
    model = tiny_model(tiny_config("llama"), seed=5)
    prompts = _prompts(6, seed=6)
    engine = tiny_engine(model, num_blocks=16, block_size=4, max_num_batched_tokens=64)
    seqs = []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(max_tokens=24, ignore_eos=True))
        seqs.extend(engine._requests[f"r{i}"])
    got = run_to_completion(engine)
    assert sum(s.num_preemptions for s in seqs) > 0
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}:0"] == reference_greedy(model, prompt, 24)
    assert_no_leaked_blocks(engine)


def test_requests_joining_mid_flight_match_reference() -> None:
    model = tiny_model(tiny_config("llama"), seed=7)
    prompts = _prompts(8, seed=8)
    engine = tiny_engine(model, num_blocks=64, max_num_batched_tokens=16)
    tokens: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        if pending:
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, greedy(max_tokens=12, ignore_eos=True))
        for out in engine.step():
            for d in out.deltas:
                tokens.setdefault(out.request_id, []).extend(d.token_ids)
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == reference_greedy(model, prompt, 12)


def test_bfloat16_engine_runs_and_mostly_agrees() -> None:
    model32 = tiny_model(tiny_config("llama"), seed=9)
    model16 = tiny_model(tiny_config("llama"), seed=9, dtype=torch.bfloat16)
    prompt = _prompts(1, seed=10)[0]
    engine = tiny_engine(model16)
    engine.add_request("a", prompt, greedy(max_tokens=8, ignore_eos=True))
    got = run_to_completion(engine)["a:0"]
    assert len(got) == 8
    assert got[0] == reference_greedy(model32, prompt, 1)[0]
