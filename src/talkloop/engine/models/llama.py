"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM; MoE variants via `MoEFeedForward`).

Forward takes a step's flattened tokens and paged-attention metadata; it returns hidden states
and leaves choosing which rows become logits to the runner. Weights arrive as canonical
(Hugging Face named) tensors from `engine.weights`; q/k/v and gate/up are fused at load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from talkloop.engine.attention import AttentionMetadata, KVCache, paged_attention
from talkloop.engine.config import ModelConfig
from talkloop.engine.errors import ModelLoadError
from talkloop.engine.models.moe import MoEFeedForward
from talkloop.engine.models.rope import RotaryEmbedding
from talkloop.engine.models.weight_map import load_into


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, rope: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        self.rope = rope
        self.qkv = _param(self.q_size + 2 * self.kv_size, config.hidden_size, dtype=dtype)
        self.qkv_bias = _param(self.q_size + 2 * self.kv_size, dtype=dtype)
        self.has_bias = config.attention_bias
        self.o_proj = _param(config.hidden_size, self.q_size, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = F.linear(x, self.qkv, self.qkv_bias if self.has_bias else None)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rope.apply(q, k, positions)
        out = paged_attention(q, k, v, cache[0], cache[1], meta, self.scale)
        return F.linear(out.flatten(1), self.o_proj)


class DenseFeedForward(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up = _param(2 * config.intermediate_size, config.hidden_size, dtype=dtype)
        self.down = _param(config.hidden_size, config.intermediate_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rope: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attn = Attention(config, rope, dtype)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp: nn.Module = (
            MoEFeedForward(config, dtype) if config.is_moe else DenseFeedForward(config, dtype)
        )

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), positions, cache, meta)
        return x + self.mlp(self.post_attn_norm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, config: ModelConfig, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> None:
        super().__init__()
        self.config = config
        rope = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            device,
        )
        self.embed_tokens = _param(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, rope, dtype) for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = self.embed_tokens
        if not config.tie_word_embeddings:
            self.lm_head = _param(config.vocab_size, config.hidden_size, dtype=dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, D] (after the final norm)."""
        x = F.embedding(input_ids, self.embed_tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, (kv_cache.keys[i], kv_cache.values[i]), meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> float32 logits [N, V]."""
        return F.linear(hidden, self.lm_head).float()

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy canonical tensors into the fused parameters (missing or extra names fail)."""
        try:
            load_into(self, tensors)
        except KeyError as exc:
            raise ModelLoadError(f"checkpoint is missing tensor {exc.args[0]!r}") from None
