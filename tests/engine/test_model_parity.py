"""Logits match transformers (same weights, fp32) within 1e-4 on tiny random models."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from talkloop.engine.config import ModelConfig, RopeScaling
from tests.engine.tiny import full_logits, random_tensors, tiny_config, tiny_model


def _hf_config(config: ModelConfig) -> Any:
    common: dict[str, Any] = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    scaling = config.rope_scaling
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if scaling.type == "linear":
        rope = {"rope_type": "linear", "factor": scaling.factor, "rope_theta": config.rope_theta}
    elif scaling.type == "llama3":
        rope = {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "rope_theta": config.rope_theta,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        }
    elif scaling.type == "yarn":
        rope = {
            "rope_type": "yarn",
            "factor": scaling.factor,
            "rope_theta": config.rope_theta,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        }
    common["rope_parameters"] = rope
    if config.architecture == "llama":
        return transformers.LlamaConfig(**common, head_dim=config.head_dim)
    if config.architecture == "qwen2":
        return transformers.Qwen2Config(**common)
    if config.architecture == "mixtral":
        return transformers.MixtralConfig(
            **{**common, "intermediate_size": config.moe_intermediate_size},
            num_local_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
        )
    return transformers.Qwen2MoeConfig(
        **common,
        num_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        moe_intermediate_size=config.moe_intermediate_size,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size,
        norm_topk_prob=config.norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def _hf_model(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> Any:
    hf_config = _hf_config(config)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    state = {}
    for name, value in tensors.items():
        if name.endswith("experts.gate_proj"):
            up = tensors[name.replace("gate_proj", "up_proj")]
            state[name.replace("gate_proj", "gate_up_proj")] = torch.cat([value, up], dim=1)
        elif not name.endswith("experts.up_proj"):
            state[name] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m or (config.tie_word_embeddings and "lm_head" in m) for m in missing), (
        missing
    )
    return model.eval()


CASES = {
    "llama": tiny_config("llama"),
    "llama-tied": tiny_config("llama", tie_word_embeddings=True),
    "llama-linear-rope": tiny_config("llama", rope_scaling=RopeScaling("linear", factor=2.0)),
    "llama-llama3-rope": tiny_config(
        "llama", rope_scaling=RopeScaling("llama3", factor=8.0, original_max_position_embeddings=64)
    ),
    "llama-yarn-rope": tiny_config(
        "llama", rope_scaling=RopeScaling("yarn", factor=4.0, original_max_position_embeddings=128)
    ),
    "qwen2": tiny_config("qwen2"),
    "mixtral": tiny_config("mixtral"),
    "qwen2_moe": tiny_config("qwen2_moe"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name: str) -> None:
    config = CASES[name]
    tensors = random_tensors(config, seed=1)
    ours = tiny_model(config, seed=1)
    theirs = _hf_model(config, tensors)
    tokens = torch.randint(0, config.vocab_size, (200,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = theirs(tokens.unsqueeze(0)).logits[0].float()
    got = full_logits(ours, tokens.tolist())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_rope_tables_follow_a_model_moved_after_construction() -> None:
    """`model.to(device)` moves parameters; the RoPE tables (plain tensors) follow the
    positions to their device on first use (found on CUDA, where they stayed on the CPU)."""
    from talkloop.engine.models.rope import RotaryEmbedding

    rope = RotaryEmbedding(16, 64, 10000.0, RopeScaling())
    cos, sin = rope.tables(torch.arange(3, device="meta"), torch.float32)
    assert cos.device.type == "meta" and sin.shape == (3, 1, 16)
    assert rope.cos.device.type == "meta"  # moved once, not per call
