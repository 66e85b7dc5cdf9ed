"""Sampler: each transform exactly, sampling statistics, and per-request seeds."""

from __future__ import annotations

import math

import pytest
import torch

from talkloop.engine.errors import InvalidRequestError
from talkloop.engine.model_runner import build_sampling_batch
from talkloop.engine.sampler import apply_penalties, apply_top_k_top_p_min_p, sample
from talkloop.engine.sampling_params import SamplingParams
from talkloop.engine.sequence import Sequence


def _batch(params: list[SamplingParams], prompts: list[list[int]] | None = None, outputs=None):
    seqs = []
    for i, p in enumerate(params):
        s = Sequence(i, f"r{i}", 0, (prompts or [[0]] * len(params))[i], p)
        s.output_token_ids = list((outputs or [[]] * len(params))[i])
        if p.seed is not None:
            s.generator = torch.Generator().manual_seed(p.seed)
        seqs.append(s)
    return build_sampling_batch(tuple(seqs))


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, 1.0, 0.0]])
    out = sample(logits, _batch([SamplingParams(temperature=0)] * 2))
    assert out.token_ids.tolist() == [1, 0]


def test_top_k_top_p_min_p_masks() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    batch = _batch([SamplingParams(top_k=2), SamplingParams(top_p=0.8), SamplingParams(min_p=0.35)])
    masked = apply_top_k_top_p_min_p(logits, batch)
    kept = torch.isfinite(masked).tolist()
    assert kept[0] == [True, True, False, False]  # top-2
    assert kept[1] == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert kept[2] == [True, True, False, False]  # >= 0.35 * 0.5


def test_penalties_follow_the_openai_and_ctrl_definitions() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    batch = _batch([params], prompts=[[0]], outputs=[[1, 2, 2]])
    got = apply_penalties(logits, batch)[0].tolist()
    # token 0: in prompt -> 2/2; token 1: -2*2, once -> -0.5-0.25; token 2: 1/2, twice.
    assert got == pytest.approx([1.0, -4.0 - 0.75, 0.5 - 0.5 - 0.5, 1.0])


def test_logit_bias_can_force_a_token() -> None:
    logits = torch.zeros(1, 10)
    out = sample(logits, _batch([SamplingParams(temperature=0, logit_bias={7: 100.0})]))
    assert out.token_ids.tolist() == [7]


def test_sampling_statistics_match_the_distribution() -> None:
    torch.manual_seed(0)
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    n = 4000
    logits = probs.log().repeat(n, 1)
    out = sample(logits, _batch([SamplingParams(temperature=1.0)] * n))
    freq = torch.bincount(out.token_ids, minlength=4).float() / n
    # 5 standard deviations of a binomial proportion
    for f, p in zip(freq.tolist(), probs.tolist(), strict=True):
        assert abs(f - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_temperature_sharpens() -> None:
    torch.manual_seed(1)
    logits = torch.tensor([1.0, 0.0]).repeat(3000, 1)
    cold = sample(logits, _batch([SamplingParams(temperature=0.25)] * 3000))
    share = (cold.token_ids == 0).float().mean().item()
    expected = 1 / (1 + math.exp(-4.0))
    assert abs(share - expected) < 0.03


def test_seed_gives_same_tokens_whatever_the_batch() -> None:
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3))
    alone = sample(logits, _batch([SamplingParams(seed=42)])).token_ids.tolist()
    crowd_logits = torch.cat([torch.randn(5, 50), logits, torch.randn(3, 50)])
    params = [SamplingParams()] * 5 + [SamplingParams(seed=42)] + [SamplingParams()] * 3
    crowd = sample(crowd_logits, _batch(params)).token_ids.tolist()
    assert crowd[5] == alone[0]


def test_logprobs_are_raw_model_logprobs() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    out = sample(logits, _batch([SamplingParams(temperature=0, logprobs=2)]))
    expected = logits.log_softmax(-1)[0]
    assert out.logprobs is not None and out.top_token_ids is not None
    assert out.logprobs.tolist() == pytest.approx([expected[2].item()])
    assert out.top_token_ids.tolist() == [[2, 1]]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {1: 500.0}}, "logit_bias"),
        ({"stop": ("",)}, "stop"),
        ({"logprobs": 50}, "logprobs"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field) as info:
        SamplingParams(**kwargs)
    assert info.value.param == field
