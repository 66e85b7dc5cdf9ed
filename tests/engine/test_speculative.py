"""Speculative decoding: greedy output unchanged, sampled output keeps the target law."""

from __future__ import annotations

import pytest
import torch

from talkloop.engine.config import SpeculativeConfig
from talkloop.engine.draft_model import DraftModelProposer
from talkloop.engine.speculative import AcceptanceTracker, Draft, NgramProposer, verify
from tests.engine.tiny import (
    assert_no_leaked_blocks,
    greedy,
    reference_greedy,
    run_to_completion,
    tiny_config,
    tiny_engine,
    tiny_model,
)

MODEL = tiny_model(tiny_config("llama"), seed=31)


class OracleProposer:
    """Proposes the reference continuation, corrupting one draft in three, so verification
    sees full accepts, partial accepts and immediate rejects."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]]) -> None:
        self.continuations = continuations
        self.calls = 0

    def propose(self, seqs, num_tokens):
        drafts = []
        for seq, n in zip(seqs, num_tokens, strict=True):
            self.calls += 1
            truth = self.continuations[tuple(seq.prompt_token_ids)]
            done = len(seq.output_token_ids)
            tokens = truth[done : done + n]
            if self.calls % 3 == 0 and tokens:
                bad = self.calls % len(tokens)
                tokens = [*tokens[:bad], (tokens[bad] + 1) % 256, *tokens[bad + 1 :]]
            drafts.append(Draft(tokens))
        return drafts


def _spec_engine(proposer=None, **kw: object):
    engine = tiny_engine(MODEL, num_blocks=96, block_size=4, max_num_batched_tokens=64, **kw)
    engine.speculator.config = SpeculativeConfig(method="ngram", num_speculative_tokens=4)
    if proposer is not None:
        engine.speculator.proposer = proposer
    return engine


def test_ngram_lookup_finds_the_latest_longest_match() -> None:
    proposer = NgramProposer(max_ngram=3, min_ngram=1)
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 7, 2, 3]
    assert proposer._lookup(tokens, 3) == [7, 7, 2]  # "2 3" last seen before "7 7"
    assert proposer._lookup([5, 6], 2) == []


def test_greedy_output_is_identical_with_speculation() -> None:
    prompts = [[10, 11, 12, 13] * 6, list(range(50, 80)), [7, 8, 9] * 5 + [1]]
    references = {tuple(p): reference_greedy(MODEL, p, 40) for p in prompts}
    engine = _spec_engine(OracleProposer(references))
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(max_tokens=40, ignore_eos=True))
    got = run_to_completion(engine)
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}:0"] == references[tuple(prompt)], f"r{i}"
    spec = engine.speculator
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens
    assert_no_leaked_blocks(engine)


def test_ngram_speculation_on_repetitive_text_matches_reference() -> None:
    # Random tiny models rarely repeat themselves, so this mostly checks that lookup misses
    # fall back to plain decoding cleanly.
    prompt = [10, 11, 12, 13] * 6
    engine = _spec_engine()
    engine.add_request("a", prompt, greedy(max_tokens=24, ignore_eos=True))
    got = run_to_completion(engine)["a:0"]
    assert got == reference_greedy(MODEL, prompt, 24)


def test_stop_inside_accepted_drafts_and_max_tokens_are_exact() -> None:
    prompt = [10, 11, 12, 13] * 6
    reference = reference_greedy(MODEL, prompt, 40)
    engine = _spec_engine(OracleProposer({tuple(prompt): reference}))
    engine.add_request("a", prompt, greedy(max_tokens=17, ignore_eos=True))
    assert run_to_completion(engine)["a:0"] == reference[:17]
    stop_at = reference[9]
    engine.add_request("b", prompt, greedy(max_tokens=40, stop_token_ids=(stop_at,)))
    assert run_to_completion(engine)["b:0"] == reference[: reference.index(stop_at) + 1]


def test_rejection_sampling_preserves_the_target_distribution() -> None:
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    g = torch.Generator().manual_seed(0)
    n = 6000
    first_model = torch.zeros(4)
    first_point = torch.zeros(4)
    for _ in range(n):
        draft_token = int(torch.multinomial(q[0], 1, generator=g))
        first_model[verify(p, Draft([draft_token], q), False, g)[0]] += 1
        first_point[verify(p, Draft([1]), False, g)[0]] += 1  # n-gram style point mass
    for counts in (first_model, first_point):
        freq = counts / n
        assert torch.allclose(freq, p[0], atol=4 * (0.25 / n) ** 0.5), freq


def test_sampled_requests_with_speculation_finish_and_free_blocks() -> None:
    from talkloop.engine.sampling_params import SamplingParams

    prompt = [10, 11, 12, 13] * 6
    engine = _spec_engine(OracleProposer({tuple(prompt): reference_greedy(MODEL, prompt, 30)}))
    params = SamplingParams(max_tokens=30, temperature=0.7, seed=3, ignore_eos=True)
    engine.add_request("s", [10, 11, 12, 13] * 6, params)
    first = run_to_completion(engine)["s:0"]
    engine.add_request("s", [10, 11, 12, 13] * 6, params)
    assert run_to_completion(engine)["s:0"] == first  # seeded: reproducible
    assert len(first) == 30
    assert_no_leaked_blocks(engine)


def test_tracker_pauses_speculation_when_acceptance_is_low() -> None:
    tracker = AcceptanceTracker(min_rate=0.5, warmup_tokens=8, retry_after_steps=3)
    tracker.record(8, 1)
    assert [tracker.should_speculate() for _ in range(4)] == [False, False, False, True]


@pytest.mark.parametrize("draft_seed", [31, 32])  # the target itself, then a different model
def test_draft_model_speculation_keeps_greedy_output(draft_seed: int) -> None:
    draft = tiny_model(tiny_config("llama", num_layers=1), seed=draft_seed)
    if draft_seed == 31:
        draft = MODEL
    engine = _spec_engine()
    engine.speculator.proposer = DraftModelProposer(
        draft, MODEL.config.vocab_size, engine.block_manager
    )
    prompts = [[10, 11, 12, 13] * 6, list(range(50, 80)), [7, 8, 9] * 5 + [1]]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(max_tokens=30, ignore_eos=True))
    got = run_to_completion(engine)
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}:0"] == reference_greedy(MODEL, prompt, 30), f"r{i}"
    spec = engine.speculator
    if draft is MODEL:
        assert spec.num_accepted_tokens == spec.num_draft_tokens > 0  # a perfect draft
    else:
        assert spec.num_draft_tokens > 0
    assert_no_leaked_blocks(engine)


def test_draft_model_with_a_different_vocab_is_refused() -> None:
    from talkloop.engine.errors import ModelLoadError

    other = tiny_model(tiny_config("llama", vocab_size=300), seed=1)
    engine = _spec_engine()
    with pytest.raises(ModelLoadError, match="vocab"):
        DraftModelProposer(other, MODEL.config.vocab_size, engine.block_manager)
