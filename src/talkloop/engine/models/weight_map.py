"""Map canonical (Hugging Face named) tensors onto the model's fused parameters.

q/k/v projections become one `qkv` matrix, gate/up one `gate_up` matrix (dense, each expert
and the shared expert). Shapes are checked; a wrong one names the tensor and both shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from talkloop.engine.errors import ModelLoadError


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ModelLoadError(
            f"tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
        )
    with torch.no_grad():
        dst.copy_(src.to(dst.dtype))


def _cat(tensors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([tensors[name] for name in names], dim=0)


def _load_attention(attn: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    proj = [f"{prefix}.self_attn.{p}_proj" for p in ("q", "k", "v")]
    qkv = _cat(tensors, [f"{p}.weight" for p in proj])
    _copy(attn.qkv.weight, qkv, f"{prefix}.self_attn.qkv")
    if attn.qkv.bias is not None:
        _copy(attn.qkv.bias, _cat(tensors, [f"{p}.bias" for p in proj]), f"{prefix}.qkv.bias")
    _copy(attn.o_proj.weight, tensors[f"{prefix}.self_attn.o_proj.weight"], f"{prefix}.o_proj")


def _load_dense(mlp: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    gate_up = _cat(tensors, [f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight"])
    _copy(_weight(mlp.gate_up), gate_up, f"{prefix}.gate_up")
    _copy(_weight(mlp.down), tensors[f"{prefix}.down_proj.weight"], f"{prefix}.down_proj.weight")


def _weight(layer: nn.Module | torch.Tensor) -> torch.Tensor:
    """The weight tensor of a `Linear` (dense MLP) or a raw parameter (the shared expert)."""
    return layer if isinstance(layer, torch.Tensor) else layer.weight


def _load_moe(moe: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    _copy(moe.router, tensors[f"{prefix}.gate.weight"], f"{prefix}.gate.weight")
    experts = f"{prefix}.experts"
    gate_up = torch.cat([tensors[f"{experts}.gate_proj"], tensors[f"{experts}.up_proj"]], dim=1)
    _copy(moe.gate_up, gate_up, f"{experts}.gate_up")
    _copy(moe.down, tensors[f"{experts}.down_proj"], f"{experts}.down_proj")
    if moe.shared is not None:
        _load_dense(moe.shared, tensors, f"{prefix}.shared_expert")
        gate_name = f"{prefix}.shared_expert_gate.weight"
        _copy(moe.shared.gate, tensors[gate_name], gate_name)


def load_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Fill `model` (a LlamaForCausalLM) from canonical tensors; KeyError names a missing one."""
    _copy(model.embed_tokens, tensors["model.embed_tokens.weight"], "model.embed_tokens.weight")
    _copy(model.norm.weight, tensors["model.norm.weight"], "model.norm.weight")
    if not model.config.tie_word_embeddings:
        _copy(model.lm_head.weight, tensors["lm_head.weight"], "lm_head.weight")
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}"
        _copy(layer.input_norm.weight, tensors[f"{prefix}.input_layernorm.weight"], prefix)
        norm = tensors[f"{prefix}.post_attention_layernorm.weight"]
        _copy(layer.post_attn_norm.weight, norm, f"{prefix}.post_attention_layernorm.weight")
        _load_attention(layer.attn, tensors, prefix)
        if model.config.is_moe:
            _load_moe(layer.mlp, tensors, f"{prefix}.mlp")
        else:
            _load_dense(layer.mlp, tensors, f"{prefix}.mlp")


def canonical_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of `load_into` for dense models: fused parameters back to canonical names."""
    config = model.config
    if config.is_moe:
        raise ValueError("canonical_tensors supports dense models only")
    out = {"model.embed_tokens.weight": model.embed_tokens, "model.norm.weight": model.norm.weight}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    q_size = config.num_heads * config.head_dim
    kv_size = config.num_kv_heads * config.head_dim
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}"
        out[f"{prefix}.input_layernorm.weight"] = layer.input_norm.weight
        out[f"{prefix}.post_attention_layernorm.weight"] = layer.post_attn_norm.weight
        q, k, v = layer.attn.qkv.weight.split([q_size, kv_size, kv_size])
        for name, value in (("q", q), ("k", k), ("v", v)):
            out[f"{prefix}.self_attn.{name}_proj.weight"] = value
        if layer.attn.qkv.bias is not None:
            biases = layer.attn.qkv.bias.split([q_size, kv_size, kv_size])
            for name, value in zip("qkv", biases, strict=True):
                out[f"{prefix}.self_attn.{name}_proj.bias"] = value
        out[f"{prefix}.self_attn.o_proj.weight"] = layer.attn.o_proj.weight
        gate, up = layer.mlp.gate_up.weight.chunk(2)
        out[f"{prefix}.mlp.gate_proj.weight"] = gate
        out[f"{prefix}.mlp.up_proj.weight"] = up
        out[f"{prefix}.mlp.down_proj.weight"] = layer.mlp.down.weight
    return {name: t.detach().float().clone() for name, t in out.items()}
