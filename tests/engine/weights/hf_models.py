"""Tiny random transformers models matching the configs in `builders`, built in the test."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2MoeConfig,
)

_COMMON: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def hf_config(architecture: str, **overrides: Any) -> PretrainedConfig:
    """The transformers config equal to `builders.<ARCH>`."""
    if architecture == "llama":
        return LlamaConfig(**_COMMON, intermediate_size=96, rms_norm_eps=1e-5, **overrides)
    if architecture == "qwen2":
        return Qwen2Config(
            **_COMMON,
            intermediate_size=96,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
            **overrides,
        )
    if architecture == "mixtral":
        return MixtralConfig(
            **_COMMON,
            intermediate_size=32,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            num_local_experts=4,
            num_experts_per_tok=2,
            **overrides,
        )
    return Qwen2MoeConfig(
        **_COMMON,
        intermediate_size=96,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        norm_topk_prob=False,
        **overrides,
    )


def random_model(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)  # norms too, so a mixed-up name cannot pass
    return model.eval()


def canonical_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """transformers 5's in-memory names → canonical names (split fused gate_up experts)."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)
            state[name.replace("gate_up_proj", "gate_proj")] = gate
            state[name.replace("gate_up_proj", "up_proj")] = up
        elif name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        else:
            state[name] = tensor
    return state


def logits(model: PreTrainedModel) -> torch.Tensor:
    input_ids = torch.tensor([[1, 5, 9, 33, 70, 2, 95, 4]])
    with torch.no_grad():
        return model(input_ids).logits
