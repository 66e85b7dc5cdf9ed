"""Speculative decoding: proposers and the verification that keeps the target distribution.

A proposer guesses k draft tokens per sequence; the target model scores the last sampled
token plus the k drafts in one forward (k + 1 logit rows); `verify` keeps the longest prefix
the target agrees with and adds one token of its own, so every step yields 1..k+1 tokens.

Rejection sampling (Leviathan et al.; gpt-fast's `speculative_decode`):
    p: target probs, q: draft probs at draft position i
    accept d_i with probability min(1, p(d_i) / q(d_i))
    on rejection sample from norm(max(p - q, 0)) and stop; if all k pass, sample from p_{k+1}.
Output is distributed exactly as sampling from p alone. A point-mass draft (n-gram lookup)
has q(d_i) = 1. Greedy rows accept while d_i == argmax p_i, so greedy output is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from typing import Protocol

import torch

from talkloop.engine.config import SpeculativeConfig
from talkloop.engine.model_runner import build_sampling_batch
from talkloop.engine.sampler import target_probs
from talkloop.engine.scheduler import ScheduledSeq, SchedulerOutput
from talkloop.engine.sequence import Sequence


@dataclass(frozen=True)
class Draft:
    token_ids: list[int]
    probs: torch.Tensor | None = None  # [k, V] draft distribution; None = point mass


class Proposer(Protocol):
    def propose(self, seqs: SequenceOf[Sequence], num_tokens: SequenceOf[int]) -> list[Draft]:
        """Up to num_tokens[i] drafts for seqs[i] (fewer, or none, is fine)."""
        ...


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the sequence's trailing n-gram
    (longest n first) and propose the tokens that followed it. No extra model."""

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, seqs: SequenceOf[Sequence], num_tokens: SequenceOf[int]) -> list[Draft]:
        return [Draft(self._lookup(s.token_ids, n)) for s, n in zip(seqs, num_tokens, strict=True)]

    def _lookup(self, tokens: list[int], num_tokens: int) -> list[int]:
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            # Scan backwards for the most recent earlier match of the tail.
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start : start + n] == tail:
                    follow = tokens[start + n : start + n + num_tokens]
                    if follow:
                        return follow
        return []


def verify(
    target_probs: torch.Tensor,
    draft: Draft,
    greedy: bool,
    generator: torch.Generator | None = None,
) -> list[int]:
    """target_probs [k + 1, V] (already temperature/top-p processed) -> accepted tokens."""
    drafts = draft.token_ids
    if greedy:
        best = target_probs.argmax(dim=-1).tolist()
        accepted: list[int] = []
        for i, token in enumerate(drafts):
            if token != best[i]:
                break
            accepted.append(token)
        return [*accepted, best[len(accepted)]]
    return _rejection_sample(target_probs, draft, generator)


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def _rejection_sample(
    target_probs: torch.Tensor, draft: Draft, generator: torch.Generator | None
) -> list[int]:
    accepted: list[int] = []
    for i, token in enumerate(draft.token_ids):
        p = target_probs[i]  # q: draft prob, p: target prob
        q = draft.probs[i] if draft.probs is not None else None
        q_token = float(q[token]) if q is not None else 1.0
        if _uniform(generator) < min(1.0, float(p[token]) / max(q_token, 1e-20)):
            accepted.append(token)
            continue
        residual = (p - q).clamp(min=0) if q is not None else p.clone()
        if q is None:
            residual[token] = 0.0
        if float(residual.sum()) <= 0:  # p == q: any token of p is a valid correction
            residual = p
        return [*accepted, _sample(residual / residual.sum(), generator)]
    return [*accepted, _sample(target_probs[len(accepted)], generator)]


@dataclass
class AcceptanceTracker:
    """Turns speculation off for a sequence when too few drafts are accepted to pay."""

    min_rate: float = 0.25
    warmup_tokens: int = 16
    retry_after_steps: int = 32
    proposed: int = 0
    accepted: int = 0
    paused_steps: int = 0

    def record(self, num_proposed: int, num_accepted: int) -> None:
        self.proposed += num_proposed
        self.accepted += num_accepted
        if self.proposed >= self.warmup_tokens and self.rate < self.min_rate:
            self.paused_steps = self.retry_after_steps
            self.proposed = self.accepted = 0

    def should_speculate(self) -> bool:
        if self.paused_steps > 0:
            self.paused_steps -= 1
            return False
        return True

    @property
    def rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class Speculator:
    """Plans, attaches and verifies drafts for the engine's step (one per engine)."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer | None = None) -> None:
        self.config = config
        self.proposer = proposer or NgramProposer(config.ngram_max, config.ngram_min)
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self._drafts: dict[int, Draft] = {}

    @property
    def enabled(self) -> bool:
        return self.config.method != "none"

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def plan(self, running: SequenceOf[Sequence], max_model_len: int) -> None:
        """Reserve draft slots for the sequences worth speculating on this step."""
        active = self.enabled and len(running) <= self.config.max_batch_size
        for seq in running:
            seq.num_lookahead_tokens = self._lookahead(seq, max_model_len) if active else 0

    def _lookahead(self, seq: Sequence, max_model_len: int) -> int:
        params = seq.params
        if (
            seq.num_uncomputed_tokens != 1
            or seq.grammar is not None
            or params.logprobs is not None
            or params.repetition_penalty != 1.0
            or params.presence_penalty
            or params.frequency_penalty
        ):
            return 0
        if seq.spec_tracker is None:
            seq.spec_tracker = AcceptanceTracker(self.config.min_acceptance_rate)
        if not seq.spec_tracker.should_speculate():
            return 0
        room = min(
            params.max_tokens - len(seq.output_token_ids) - 1, max_model_len - seq.num_tokens - 1
        )
        return max(0, min(self.config.num_speculative_tokens, room))

    def attach_drafts(self, output: SchedulerOutput) -> SchedulerOutput:
        """Fill in drafts where slots were reserved; shrink the chunks to what was proposed."""
        wanting = [item for item in output.scheduled if item.num_draft_tokens]
        if not wanting:
            return output
        drafts = self.proposer.propose(
            [item.seq for item in wanting], [item.num_draft_tokens for item in wanting]
        )
        by_seq: dict[int, Draft] = {}
        for item, draft in zip(wanting, drafts, strict=True):
            draft = Draft(draft.token_ids[: item.num_draft_tokens], draft.probs)
            item.seq.draft_token_ids = draft.token_ids
            by_seq[item.seq.seq_id] = draft
        self._drafts = by_seq
        items = tuple(self._resize(item) for item in output.scheduled)
        return SchedulerOutput(items, output.preempted_seq_ids)

    def _resize(self, item: ScheduledSeq) -> ScheduledSeq:
        if not item.num_draft_tokens:
            return item
        num_drafts = len(item.seq.draft_token_ids)
        return ScheduledSeq(
            item.seq, item.num_new_tokens - item.num_draft_tokens + num_drafts, num_drafts
        )

    def verify(
        self, seqs: SequenceOf[tuple[Sequence, int]], logits: torch.Tensor | None
    ) -> dict[int, list[int]]:
        """Accepted tokens (1..k+1) per speculating sequence id."""
        if logits is None:
            return {}
        rows = [seq for seq, num_rows in seqs for _ in range(num_rows)]
        probs = target_probs(logits, build_sampling_batch(tuple(rows)))
        accepted: dict[int, list[int]] = {}
        start = 0
        for seq, num_rows in seqs:
            draft = self._drafts.pop(seq.seq_id)
            tokens = verify(
                probs[start : start + num_rows], draft, seq.params.greedy, seq.generator
            )
            start += num_rows
            accepted[seq.seq_id] = tokens
            seq.draft_token_ids = []
            self.num_draft_tokens += len(draft.token_ids)
            self.num_accepted_tokens += len(tokens) - 1
            seq.spec_tracker.record(len(draft.token_ids), len(tokens) - 1)
        return accepted
