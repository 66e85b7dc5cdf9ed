"""Batched, vectorised sampling: penalties, logit bias, temperature, top-k/top-p/min-p.

One call samples a token for every row of a [N, V] logits batch. Rows with a seed draw their
noise from their own generator, so a seeded request gives the same output whatever else is in
the batch. Sampling uses the exponential race: argmax(p / E), E ~ Exp(1), is a draw from p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from talkloop.engine.native import argmax_rows


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling settings for one step ([N] tensors unless noted)."""

    temperatures: torch.Tensor  # float32; 0 = greedy
    top_ks: torch.Tensor  # int64; 0 = off
    top_ps: torch.Tensor  # float32
    min_ps: torch.Tensor  # float32
    repetition_penalties: torch.Tensor  # float32
    presence_penalties: torch.Tensor  # float32
    frequency_penalties: torch.Tensor  # float32
    prompt_token_ids: torch.Tensor | None  # [N, Lp] int64 padded with -1; None if no penalties
    output_token_ids: torch.Tensor | None  # [N, Lo] int64 padded with -1
    bias_rows: torch.Tensor | None  # [K] int64 row of each logit-bias entry
    bias_token_ids: torch.Tensor | None  # [K] int64
    bias_values: torch.Tensor | None  # [K] float32
    generators: tuple[torch.Generator | None, ...]
    max_num_logprobs: int | None  # None = no row asked for logprobs

    @property
    def all_greedy(self) -> bool:
        return bool((self.temperatures == 0).all())


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None  # [N] float32: logprob of the chosen token
    top_logprobs: torch.Tensor | None  # [N, k] float32
    top_token_ids: torch.Tensor | None  # [N, k] int64


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, L] ids padded with -1 -> [N, V] counts."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.float32)
    index = torch.where(token_ids < 0, vocab_size, token_ids)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if batch.output_token_ids is None or batch.prompt_token_ids is None:
        return logits
    vocab_size = logits.shape[1]
    output_counts = _token_counts(batch.output_token_ids, vocab_size).to(logits.device)
    prompt_seen = _token_counts(batch.prompt_token_ids, vocab_size).to(logits.device) > 0
    seen = prompt_seen | (output_counts > 0)
    # Repetition penalty (CTRL): shrink the logit of every seen token towards "less likely".
    penalty = batch.repetition_penalties.unsqueeze(1).expand_as(logits)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = torch.where(seen, penalized, logits)
    # OpenAI penalties count generated tokens only.
    logits = logits - batch.frequency_penalties.unsqueeze(1) * output_counts
    return logits - batch.presence_penalties.unsqueeze(1) * (output_counts > 0).float()


def apply_logit_bias(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if batch.bias_rows is None or batch.bias_token_ids is None or batch.bias_values is None:
        return logits
    logits = logits.clone()
    logits.index_put_((batch.bias_rows, batch.bias_token_ids), batch.bias_values, accumulate=True)
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k, outside the top-p nucleus, or below min_p * p_max."""
    vocab_size = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab_size, device=logits.device).unsqueeze(0)
    top_ks = torch.where(batch.top_ks > 0, batch.top_ks, vocab_size).unsqueeze(1)
    remove = ranks >= top_ks
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    # Nucleus: drop a token when the mass strictly before it already reaches top_p.
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= batch.top_ps.unsqueeze(1)
    remove |= probs < batch.min_ps.unsqueeze(1) * probs[:, :1]
    remove[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _exponential_noise(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_()
    for row, generator in enumerate(batch.generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    return noise


def _needs_filtering(batch: SamplingBatch) -> bool:
    return bool((batch.top_ks > 0).any() or (batch.top_ps < 1).any() or (batch.min_ps > 0).any())


def target_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The distribution each row samples from (bias, temperature, top-k/p, min-p applied).

    Used to verify speculative drafts; rows with temperature 0 keep argmax order."""
    logits = apply_logit_bias(logits, batch)
    scaled = logits / batch.temperatures.clamp(min=1e-5).unsqueeze(1).to(logits.device)
    if _needs_filtering(batch):
        scaled = apply_top_k_top_p_min_p(scaled, batch)
    return scaled.softmax(dim=-1)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """logits [N, V] float32 -> one token per row (plus logprobs when asked)."""
    raw_logprobs = logits.log_softmax(dim=-1) if batch.max_num_logprobs is not None else None
    logits = apply_logit_bias(apply_penalties(logits, batch), batch)
    token_ids = argmax_rows(logits)
    if not batch.all_greedy:
        temperatures = batch.temperatures.clamp(min=1e-5).unsqueeze(1).to(logits.device)
        scaled = logits / temperatures
        if _needs_filtering(batch):
            scaled = apply_top_k_top_p_min_p(scaled, batch)
        probs = scaled.softmax(dim=-1)
        sampled = argmax_rows(probs / _exponential_noise(probs, batch))
        token_ids = torch.where(batch.temperatures.to(logits.device) == 0, token_ids, sampled)
    return _with_logprobs(token_ids, raw_logprobs, batch.max_num_logprobs)


def _with_logprobs(
    token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None, num_top: int | None
) -> SamplerOutput:
    if raw_logprobs is None or num_top is None:
        return SamplerOutput(token_ids, None, None, None)
    chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top_values, top_ids = raw_logprobs.topk(num_top, dim=-1) if num_top else (None, None)
    return SamplerOutput(token_ids, chosen, top_values, top_ids)
