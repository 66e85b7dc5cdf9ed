"""`Checkpoint`: a model's config plus its tensors under canonical names, and their checks.

Canonical names are Hugging Face Llama names with MoE experts stacked per layer
(`model.layers.{i}.mlp.experts.gate_proj` is [E, I, D]). Every loader returns this shape of
data and every consumer (model code, converters) reads only this; it does not load files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from talkloop.engine.config import ModelConfig
from talkloop.engine.errors import ModelLoadError, UnsupportedModelError

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """Weights ready for the model code: float32 tensors under canonical names."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    source: Path
    # GGUF key/values as plain Python values (str, int, float, bool, lists); for a
    # safetensors folder, config.json. The tokenizer reads `tokenizer.*` keys from here.
    metadata: dict[str, Any] = field(default_factory=dict)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor `config` needs, with its shape."""
    vocab, hidden = config.vocab_size, config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {EMBED: (vocab, hidden), FINAL_NORM: (hidden,)}
    if not config.tie_word_embeddings:
        shapes[LM_HEAD] = (vocab, hidden)
    for layer in range(config.num_layers):
        prefix = layer_prefix(layer)
        shapes |= _attention_shapes(config, prefix)
        shapes |= _moe_shapes(config, prefix) if config.is_moe else _mlp_shapes(config, prefix)
    return shapes


def _attention_shapes(config: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    hidden = config.hidden_size
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    attn = prefix + "self_attn."
    shapes: dict[str, tuple[int, ...]] = {
        prefix + "input_layernorm.weight": (hidden,),
        prefix + "post_attention_layernorm.weight": (hidden,),
        attn + "q_proj.weight": (q_rows, hidden),
        attn + "k_proj.weight": (kv_rows, hidden),
        attn + "v_proj.weight": (kv_rows, hidden),
        attn + "o_proj.weight": (hidden, q_rows),
    }
    if config.attention_bias:
        shapes |= {
            attn + "q_proj.bias": (q_rows,),
            attn + "k_proj.bias": (kv_rows,),
            attn + "v_proj.bias": (kv_rows,),
        }
    return shapes


def _mlp_shapes(
    config: ModelConfig, prefix: str, inner: int | None = None
) -> dict[str, tuple[int, ...]]:
    hidden, inner = config.hidden_size, inner or config.intermediate_size
    return {
        prefix + "mlp.gate_proj.weight": (inner, hidden),
        prefix + "mlp.up_proj.weight": (inner, hidden),
        prefix + "mlp.down_proj.weight": (hidden, inner),
    }


def _moe_shapes(config: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    hidden, experts, inner = config.hidden_size, config.num_experts, config.moe_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        prefix + "mlp.gate.weight": (experts, hidden),
        prefix + "mlp.experts.gate_proj": (experts, inner, hidden),
        prefix + "mlp.experts.up_proj": (experts, inner, hidden),
        prefix + "mlp.experts.down_proj": (experts, hidden, inner),
    }
    shared = config.shared_expert_intermediate_size
    if shared:
        shapes |= {
            name.replace(".mlp.", ".mlp.shared_expert."): shape
            for name, shape in _mlp_shapes(config, prefix, shared).items()
        }
        shapes[prefix + "mlp.shared_expert_gate.weight"] = (1, hidden)
    return shapes


def check_shapes(config: ModelConfig, shapes: dict[str, tuple[int, ...]], source: Path) -> None:
    """Raise unless `shapes` names exactly the canonical tensors of `config`, shaped right."""
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in shapes:
            raise ModelLoadError(f"{source}: missing tensor {name} (expected shape {list(shape)})")
        if tuple(shapes[name]) != shape:
            raise ModelLoadError(
                f"{source}: tensor {name} has shape {list(shapes[name])}, "
                f"expected {list(shape)} from the model config"
            )
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise UnsupportedModelError(
            f"{source}: tensors {unexpected[:5]} are not part of a supported "
            f"{config.architecture} model (ignoring them would change its outputs)"
        )
