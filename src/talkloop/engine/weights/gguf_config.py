"""GGUF metadata (`general.*`, `{arch}.*`, `tokenizer.ggml.*`) → `ModelConfig`.

Reads hyper-parameters the way llama.cpp's loader does, and recovers Llama-3 RoPE scaling from
the `rope_freqs.weight` factors convert_hf_to_gguf.py writes in its place. Tensor data is not
read here, only tensor shapes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType

from talkloop.engine.config import ModelConfig, RopeScaling
from talkloop.engine.errors import ModelLoadError, UnsupportedModelError

# GGUF `general.architecture` → canonical architecture (before the MoE check).
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen2moe": "qwen2_moe"}
# llama.cpp's converter permutes Q/K rows for these (interleaved RoPE pairs); Qwen2 is not.
PERMUTED_QK = frozenset({"llama"})
# Meta's Llama-3.x values; GGUF keeps only the per-frequency factors they produce.
LLAMA3_ORIGINAL_CONTEXT, LLAMA3_LOW_FREQ_FACTOR, LLAMA3_HIGH_FREQ_FACTOR = 8192, 1.0, 4.0

Shapes = dict[str, tuple[int, ...]]  # GGUF tensor name -> logical row-major shape


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every key/value of the file as plain Python values (float32s as their shortest repr)."""
    values: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if field.types == [GGUFValueType.FLOAT32]:
            value = float(str(np.float32(value)))  # 9.99999974e-06 -> 1e-05
        values[key] = value
    return values


def gguf_architecture(metadata: dict[str, Any], source: Path) -> str:
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{source}: general.architecture is {arch!r}; supported: {sorted(ARCHITECTURES)}"
        )
    return str(arch)


def config_from_gguf(
    metadata: dict[str, Any], shapes: Shapes, source: Path, rope_freqs: torch.Tensor | None
) -> ModelConfig:
    """The `ModelConfig` of a GGUF file, from its metadata and tensor shapes."""
    arch = gguf_architecture(metadata, source)
    meta = _Meta(metadata, arch, source)
    hidden, num_heads = meta.require("embedding_length"), meta.require("attention.head_count")
    head_dim = meta.get("attention.key_length", hidden // num_heads)
    _check_rope_dims(meta, head_dim)
    rope_theta = float(meta.get("rope.freq_base", 10000.0))
    num_experts = meta.get("expert_count", 0)
    try:
        return ModelConfig(
            architecture="mixtral" if arch == "llama" and num_experts else ARCHITECTURES[arch],
            vocab_size=_vocab_size(meta, shapes),
            hidden_size=hidden,
            intermediate_size=_uniform(meta, "feed_forward_length", 0),
            num_layers=meta.require("block_count"),
            num_heads=num_heads,
            num_kv_heads=_uniform(meta, "attention.head_count_kv", num_heads),
            head_dim=head_dim,
            max_position_embeddings=meta.get("context_length", 2048),
            rms_norm_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=_rope_scaling(meta, rope_freqs, head_dim, rope_theta),
            tie_word_embeddings="output.weight" not in shapes,
            attention_bias="blk.0.attn_q.bias" in shapes,
            **_moe_fields(meta, shapes, num_experts),
            **_special_tokens(metadata),
        )
    except ValueError as exc:
        raise ModelLoadError(f"{source}: invalid model metadata: {exc}") from exc


class _Meta:
    """`{arch}.`-prefixed metadata lookups that name the file and key when they fail."""

    def __init__(self, metadata: dict[str, Any], arch: str, source: Path) -> None:
        self.metadata, self.arch, self.source = metadata, arch, source

    def key(self, name: str) -> str:
        return f"{self.arch}.{name}"

    def get(self, name: str, default: Any) -> Any:
        return self.metadata.get(self.key(name), default)

    def require(self, name: str) -> Any:
        if self.key(name) not in self.metadata:
            raise ModelLoadError(f"{self.source}: metadata key {self.key(name)} is missing")
        return self.metadata[self.key(name)]


def _uniform(meta: _Meta, name: str, default: int) -> int:
    """A per-model count that some files store per layer; all layers must agree."""
    value = meta.get(name, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedModelError(
                f"{meta.source}: {meta.key(name)} differs between layers ({value[:8]}...)"
            )
        value = value[0]
    return int(value)


def _check_rope_dims(meta: _Meta, head_dim: int) -> None:
    rope_dims = meta.get("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise UnsupportedModelError(
            f"{meta.source}: {meta.key('rope.dimension_count')} is {rope_dims} but head_dim is "
            f"{head_dim}; partial rotary embeddings are not supported"
        )


def _vocab_size(meta: _Meta, shapes: Shapes) -> int:
    if meta.key("vocab_size") in meta.metadata:
        return int(meta.metadata[meta.key("vocab_size")])
    if "token_embd.weight" in shapes:
        return shapes["token_embd.weight"][0]
    tokens = meta.metadata.get("tokenizer.ggml.tokens")
    if tokens:
        return len(tokens)
    raise ModelLoadError(f"{meta.source}: no {meta.key('vocab_size')}, token list or embedding")


def _moe_fields(meta: _Meta, shapes: Shapes, num_experts: int) -> dict[str, Any]:
    if not num_experts:
        return {}
    shared = meta.get("expert_shared_feed_forward_length", 0)
    if not shared and "blk.0.ffn_gate_shexp.weight" in shapes:
        shared = shapes["blk.0.ffn_gate_shexp.weight"][0]  # [S, D]
    return {
        "num_experts": num_experts,
        "num_experts_per_tok": meta.get("expert_used_count", 0),
        "moe_intermediate_size": meta.get(
            "expert_feed_forward_length", meta.get("feed_forward_length", 0)
        ),
        "shared_expert_intermediate_size": shared,
        # Mixtral always renormalises the top-k weights; Qwen2-MoE only when flagged.
        "norm_topk_prob": bool(meta.get("expert_weights_norm", meta.arch == "llama")),
    }


def _special_tokens(metadata: dict[str, Any]) -> dict[str, Any]:
    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and token_id not in eos_ids:
            eos_ids.append(int(token_id))
    return {
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_ids": tuple(eos_ids),
    }


def _rope_scaling(
    meta: _Meta, rope_freqs: torch.Tensor | None, head_dim: int, rope_theta: float
) -> RopeScaling:
    kind = meta.get("rope.scaling.type", "none")
    factor = float(meta.get("rope.scaling.factor", meta.get("rope.scale_linear", 1.0)))
    original = int(meta.get("rope.scaling.original_context_length", 0))
    if rope_freqs is not None:
        if kind not in ("none", "llama3"):
            raise UnsupportedModelError(
                f"{meta.source}: rope_freqs.weight together with {meta.key('rope.scaling.type')}"
                f" = {kind!r} is not supported"
            )
        return _llama3_from_factors(meta.source, rope_freqs, head_dim, rope_theta, original)
    if kind == "none":
        return RopeScaling("linear", factor) if factor != 1.0 else RopeScaling()
    if kind == "linear":
        return RopeScaling("linear", factor)
    if kind == "yarn":
        attention_factor = meta.get("rope.scaling.attn_factor", None)
        return RopeScaling(
            "yarn",
            factor,
            original,
            beta_fast=float(meta.get("rope.scaling.yarn_beta_fast", 32.0)),
            beta_slow=float(meta.get("rope.scaling.yarn_beta_slow", 1.0)),
            attention_factor=None if attention_factor is None else float(attention_factor),
        )
    raise UnsupportedModelError(
        f"{meta.source}: {meta.key('rope.scaling.type')} = {kind!r} is not supported "
        f"(supported: none, linear, yarn, and llama3 via rope_freqs.weight)"
    )


def llama3_rope_factors(scaling: RopeScaling, head_dim: int, rope_theta: float) -> torch.Tensor:
    """Per-frequency divisors of Llama-3 RoPE scaling, as convert_hf_to_gguf.py computes them."""
    # inv_freq_j = theta^(-2j/head_dim); wavelength = 2*pi / inv_freq   # [head_dim / 2]
    inv_freq = rope_theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    original = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    smooth = (original / wavelen - low) / (high - low)
    factors = 1 / ((1 - smooth) / scaling.factor + smooth)
    factors = torch.where(wavelen < original / high, 1.0, factors)
    factors = torch.where(wavelen > original / low, scaling.factor, factors)
    return factors.float()


def _llama3_from_factors(
    source: Path, rope_freqs: torch.Tensor, head_dim: int, rope_theta: float, original: int
) -> RopeScaling:
    """The Llama-3 scaling (Meta's default low/high factors) whose factors match the file's."""
    scaling = RopeScaling(
        "llama3",
        factor=float(rope_freqs.max()),
        original_max_position_embeddings=original or LLAMA3_ORIGINAL_CONTEXT,
        low_freq_factor=LLAMA3_LOW_FREQ_FACTOR,
        high_freq_factor=LLAMA3_HIGH_FREQ_FACTOR,
    )
    expected = llama3_rope_factors(scaling, head_dim, rope_theta)
    if rope_freqs.shape != expected.shape or not torch.allclose(rope_freqs, expected, rtol=1e-4):
        raise UnsupportedModelError(
            f"{source}: rope_freqs.weight does not match Llama-3 RoPE scaling with factor "
            f"{scaling.factor}, low/high frequency factors 1/4 and original context "
            f"{scaling.original_max_position_embeddings}; other per-frequency factors are "
            f"not supported"
        )
    return scaling
