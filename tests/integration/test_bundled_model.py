"""The bundled SmolLM2-135M: greedy output equals transformers' on the same weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from talkloop.engine.config import CacheConfig, EngineConfig
from talkloop.engine.loader import LoadedModel, build_engine, load_model
from talkloop.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.integration

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about a lighthouse.",
    "Explain what a hash table is in two sentences.",
    "Give me three names for a friendly robot.",
    "How do I boil an egg?",
]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(EngineConfig(dtype="float32"))


def _hf_model(loaded: LoadedModel) -> transformers.LlamaForCausalLM:
    c = loaded.model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
    )
    model = transformers.LlamaForCausalLM(hf_config).eval()
    from talkloop.engine.weights import load_checkpoint

    tensors = load_checkpoint(loaded.path).tensors
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


@torch.inference_mode()
def _hf_greedy(model: transformers.LlamaForCausalLM, ids: list[int], num: int) -> list[int]:
    """Plain greedy loop with transformers' KV cache (EOS is just another token here)."""
    out = model(torch.tensor([ids]), use_cache=True)
    tokens: list[int] = []
    for _ in range(num):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(
            torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True
        )
    return tokens


def test_greedy_matches_transformers_for_five_chat_prompts(loaded: LoadedModel) -> None:
    engine = build_engine(
        EngineConfig(dtype="float32", cache=CacheConfig(kv_cache_bytes=64 << 20)), loaded
    )
    hf = _hf_model(loaded)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    prompts = []
    for i, text in enumerate(PROMPTS):
        rendered = loaded.chat_template.render([{"role": "user", "content": text}])
        ids = loaded.tokenizer.encode(rendered, add_special_tokens=False)
        prompts.append(ids)
        engine.add_request(f"p{i}", ids, params)
    ours: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            ours.setdefault(out.request_id, []).extend(out.deltas[0].token_ids)
    for i, ids in enumerate(prompts):
        expected = _hf_greedy(hf, ids, 64)
        assert ours[f"p{i}"] == expected, PROMPTS[i]


def test_bundled_model_answers_sensibly(loaded: LoadedModel) -> None:
    engine = build_engine(
        EngineConfig(dtype="bfloat16"), load_model(EngineConfig(dtype="bfloat16"))
    )
    rendered = loaded.chat_template.render(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    ids = loaded.tokenizer.encode(rendered, add_special_tokens=False)
    engine.add_request("a", ids, SamplingParams(max_tokens=32, temperature=0.0))
    text, reason = "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.deltas[0].text
            reason = out.deltas[0].finish_reason or reason
    assert "Paris" in text
    assert reason == "stop" and "<|im_end|>" not in text


def test_ngram_speculation_keeps_greedy_output_on_the_bundled_model(loaded: LoadedModel) -> None:
    from talkloop.engine.config import SpeculativeConfig

    text = "Repeat this list exactly three times: apple, banana, cherry, date, elderberry."
    rendered = loaded.chat_template.render([{"role": "user", "content": text}])
    ids = loaded.tokenizer.encode(rendered, add_special_tokens=False)
    outputs = {}
    for method in ("none", "ngram"):
        config = EngineConfig(
            dtype="float32",
            cache=CacheConfig(kv_cache_bytes=64 << 20),
            speculative=SpeculativeConfig(method=method),
        )
        engine = build_engine(config, loaded)
        engine.add_request("a", ids, SamplingParams(max_tokens=48, temperature=0.0))
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens += out.deltas[0].token_ids
        outputs[method] = (tokens, engine.speculator.num_accepted_tokens)
    assert outputs["ngram"][0] == outputs["none"][0]
    assert outputs["ngram"][1] > 0  # the repeated list is proposed by prompt lookup
