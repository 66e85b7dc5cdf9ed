"""Hugging Face `config.json` ↔ `ModelConfig`, for llama, mistral, qwen2, mixtral, qwen2_moe.

Reads both transformers 4 (`rope_theta` + `rope_scaling`) and 5 (`rope_parameters`) configs;
writes the transformers 4 form, which transformers 5 and vLLM also read. No tensors here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from talkloop.engine.config import ModelConfig, RopeScaling
from talkloop.engine.errors import ModelLoadError, UnsupportedModelError

logger = logging.getLogger(__name__)

HF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")


def config_from_hf(
    hf: dict[str, Any], source: Path, generation: dict[str, Any] | None = None
) -> ModelConfig:
    """`ModelConfig` from a parsed config.json (and generation_config.json, for stop ids)."""
    model_type = hf.get("model_type")
    if model_type not in HF_CLASSES:
        raise UnsupportedModelError(
            f"{source}: config.json model_type is {model_type!r}; supported: {sorted(HF_CLASSES)}"
        )
    _check_supported(hf, source)
    for key in (*_REQUIRED, "num_attention_heads"):
        if not isinstance(hf.get(key), int):
            raise ModelLoadError(f"{source}: config.json {key} is missing or not an integer")
    num_heads = hf["num_attention_heads"]
    try:
        rope_theta, rope_scaling = _rope_from_hf(hf, source)
        return ModelConfig(
            architecture=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=_attention_bias(hf),
            **_moe_from_hf(hf),
            **_special_tokens(hf, generation or {}),
        )
    except ValueError as exc:
        raise ModelLoadError(f"{source}: invalid config.json: {exc}") from exc


def _check_supported(hf: dict[str, Any], source: Path) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act {hf['hidden_act']!r} is not silu")
    if hf.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: mlp_bias = true is not supported")
    if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
        raise UnsupportedModelError(
            f"{source}: dense layers inside a MoE model (decoder_sparse_step / mlp_only_layers)"
            " are not supported"
        )
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", hf["model_type"] != "qwen2")
    if window and uses_window and window < hf.get("max_position_embeddings", 0):
        logger.warning(
            "%s: sliding_window=%s is ignored; attention is full, so outputs differ from the "
            "reference beyond %s tokens",
            source,
            window,
            window,
        )


def _attention_bias(hf: dict[str, Any]) -> bool:
    model_type = hf["model_type"]
    if model_type == "qwen2":
        return True
    if model_type == "qwen2_moe":
        return bool(hf.get("qkv_bias", True))
    return bool(hf.get("attention_bias", False))


def _moe_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    if hf["model_type"] == "mixtral":
        return {
            "num_experts": hf.get("num_local_experts", 8),
            "num_experts_per_tok": hf.get("num_experts_per_tok", 2),
            "moe_intermediate_size": hf["intermediate_size"],
            "norm_topk_prob": True,
        }
    if hf["model_type"] == "qwen2_moe":
        return {
            "num_experts": hf.get("num_experts", 60),
            "num_experts_per_tok": hf.get("num_experts_per_tok", 4),
            "moe_intermediate_size": hf.get("moe_intermediate_size", 1408),
            "shared_expert_intermediate_size": hf.get("shared_expert_intermediate_size", 5632),
            "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
        }
    return {}


def _special_tokens(hf: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    eos_ids: list[int] = []
    for source in (hf, generation):
        value = source.get("eos_token_id")
        for token_id in value if isinstance(value, list) else [value]:
            if isinstance(token_id, int) and token_id not in eos_ids:
                eos_ids.append(token_id)
    bos = hf.get("bos_token_id", generation.get("bos_token_id"))
    return {"bos_token_id": bos if isinstance(bos, int) else None, "eos_token_ids": tuple(eos_ids)}


def _rope_from_hf(hf: dict[str, Any], source: Path) -> tuple[float, RopeScaling]:
    params = hf.get("rope_parameters") or {}  # transformers 5
    scaling = hf.get("rope_scaling") or params
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, RopeScaling()
    factor = float(scaling.get("factor", 1.0))
    original = int(scaling.get("original_max_position_embeddings") or 0)
    if kind == "linear":
        return theta, RopeScaling("linear", factor, original)
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        return theta, RopeScaling("llama3", factor, original, low, high)
    if kind == "yarn":
        attention_factor = scaling.get("attention_factor")
        return theta, RopeScaling(
            "yarn",
            factor,
            original,
            beta_fast=float(scaling.get("beta_fast", 32.0)),
            beta_slow=float(scaling.get("beta_slow", 1.0)),
            attention_factor=None if attention_factor is None else float(attention_factor),
        )
    raise UnsupportedModelError(
        f"{source}: rope scaling type {kind!r} is not supported (default, linear, llama3, yarn are)"
    )


def hf_config_dict(config: ModelConfig, dtype: str) -> dict[str, Any]:
    """config.json contents transformers and vLLM load `config` from."""
    model_type = _savable_model_type(config)
    hf: dict[str, Any] = {
        "architectures": [HF_CLASSES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": _rope_to_hf(config.rope_scaling),
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": config.bos_token_id,
        "eos_token_id": _eos_to_hf(config.eos_token_ids),
        "torch_dtype": dtype,
        "use_cache": True,
    }
    return hf | _type_specific(config, model_type)


def _savable_model_type(config: ModelConfig) -> str:
    model_type = config.architecture
    problem = None
    if model_type not in HF_CLASSES:
        problem = "is not a transformers model type this converter knows"
    elif model_type in ("mistral", "mixtral") and config.attention_bias:
        problem = "has no attention bias in transformers"
    elif model_type == "qwen2" and not config.attention_bias:
        problem = "always has an attention bias in transformers"
    elif model_type == "mixtral" and (
        config.shared_expert_intermediate_size or not config.norm_topk_prob
    ):
        problem = "has no shared expert and always renormalises top-k weights in transformers"
    elif model_type == "qwen2_moe" and not config.shared_expert_intermediate_size:
        problem = "always has a shared expert in transformers"
    if problem:
        raise UnsupportedModelError(f"cannot save as Hugging Face: {model_type!r} {problem}")
    return model_type


def _type_specific(config: ModelConfig, model_type: str) -> dict[str, Any]:
    if model_type == "llama":
        return {"attention_bias": config.attention_bias, "mlp_bias": False}
    if model_type == "mixtral":
        return {
            "intermediate_size": config.moe_intermediate_size,
            "num_local_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "sliding_window": None,
        }
    if model_type == "qwen2_moe":
        return {
            "num_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "moe_intermediate_size": config.moe_intermediate_size,
            "shared_expert_intermediate_size": config.shared_expert_intermediate_size,
            "norm_topk_prob": config.norm_topk_prob,
            "qkv_bias": config.attention_bias,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "use_sliding_window": False,
        }
    return {"sliding_window": None, "use_sliding_window": False}  # mistral, qwen2


def _rope_to_hf(scaling: RopeScaling) -> dict[str, Any] | None:
    if scaling.type == "none":
        return None
    hf: dict[str, Any] = {"rope_type": scaling.type, "factor": scaling.factor}
    if scaling.type in ("llama3", "yarn"):
        hf["original_max_position_embeddings"] = scaling.original_max_position_embeddings
    if scaling.type == "llama3":
        hf |= {
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
        }
    if scaling.type == "yarn":
        hf |= {"beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow}
        if scaling.attention_factor is not None:
            hf["attention_factor"] = scaling.attention_factor
    return hf


def _eos_to_hf(eos_ids: tuple[int, ...]) -> int | list[int] | None:
    if not eos_ids:
        return None
    return eos_ids[0] if len(eos_ids) == 1 else list(eos_ids)
