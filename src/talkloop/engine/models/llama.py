"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM; MoE variants via `MoEFeedForward`).

Forward takes a step's flattened tokens and paged-attention metadata; it returns hidden states
and leaves choosing which rows become logits to the runner. Weights arrive as canonical
(Hugging Face named) tensors from `engine.weights`; q/k/v and gate/up are fused at load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from talkloop.engine import native
from talkloop.engine.attention import AttentionMetadata, KVCache, PrefillChunk, paged_attention
from talkloop.engine.config import ModelConfig
from talkloop.engine.errors import ModelLoadError
from talkloop.engine.models.linear import Linear, QuantizedLinear
from talkloop.engine.models.moe import MoEFeedForward
from talkloop.engine.models.rope import RotaryEmbedding, apply_rope
from talkloop.engine.models.weight_map import load_into


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = native.rms_norm(x, self.weight, self.eps)  # one kernel instead of four to six
        if fused is not None:
            return fused
        # Normalise in float32, cast back, then scale (transformers' order of operations).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        qkv_size = self.q_size + 2 * self.kv_size
        self.qkv = Linear(qkv_size, config.hidden_size, config.attention_bias, dtype)
        self.o_proj = Linear(config.hidden_size, self.q_size, False, dtype)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        heads = self.qkv(x).view(x.shape[0], -1, self.head_dim)  # [T, H + 2 Hkv, D]
        num_qk = self.num_heads + self.num_kv_heads
        qk = apply_rope(heads[:, :num_qk], *rope)  # q and k rotated together
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = heads[:, num_qk:]
        out = paged_attention(q, k, v, cache[0], cache[1], meta, self.scale)
        return self.o_proj(out.flatten(1))


class DenseFeedForward(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up = Linear(2 * inter, config.hidden_size, False, dtype)
        self.down = Linear(config.hidden_size, inter, False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attn = Attention(config, dtype)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp: nn.Module = (
            MoEFeedForward(config, dtype) if config.is_moe else DenseFeedForward(config, dtype)
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), rope, cache, meta)
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
        self.rope = rope
        self.layers = nn.ModuleList(DecoderLayer(config, dtype) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = Linear(config.vocab_size, config.hidden_size, False, dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, D] (after the final norm)."""
        x = F.embedding(input_ids, self.embed_tokens)
        rope = self.rope.tables(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, (kv_cache.keys[i], kv_cache.values[i]), meta)
        return self.norm(x)

    def prefill(self, token_ids: list[int]) -> torch.Tensor:
        """Hidden states [T, D] of one sequence in a single prefill, through a scratch cache of
        its own (no engine): calibration at load, and tests."""
        c = self.config
        n = len(token_ids)
        dtype = self.embed_tokens.dtype
        device = self.embed_tokens.device
        cache = KVCache(c.num_layers, n, 1, c.num_kv_heads, c.head_dim, dtype, device)
        positions = torch.arange(n, device=device)
        meta = AttentionMetadata(
            slot_mapping=positions,
            prefills=(PrefillChunk(0, n, n, positions),),
            num_prefill_tokens=n,
            decode_block_tables=torch.zeros(0, 0, dtype=torch.int64),
            decode_context_lens=torch.zeros(0, dtype=torch.int64),
            decode_bias=None,
        )
        with torch.inference_mode():
            return self(torch.tensor(token_ids, device=device), positions, cache, meta)

    def decode_plan(self, kv_cache: KVCache) -> native.DecodePlan | None:
        """The whole decode step as one native call over this model and `kv_cache`, for up to
        as many rows as the quantized linears keep their weight-only kernels (where per-op
        overhead, not arithmetic, bounds a step); None where it cannot serve: no native
        kernels, not the CPU, an MoE feed-forward, or a dtype or linear it does not know."""
        rows = _decode_plan_rows(self)
        if (
            rows is None
            or native.library() is None
            or self.embed_tokens.device.type != "cpu"
            or kv_cache.dtype != self.embed_tokens.dtype
        ):
            return None
        layers = []
        for i, layer in enumerate(_decoder_layers(self)):
            qkv, o_proj, gate_up, down = map(_linear_weights, _linears(layer))
            layers.append(
                native.DecoderWeights(
                    input_norm=layer.input_norm.weight,
                    post_attn_norm=layer.post_attn_norm.weight,
                    qkv=qkv,
                    o_proj=o_proj,
                    gate_up=gate_up,
                    down=down,
                    key_cache=kv_cache.keys[i],
                    value_cache=kv_cache.values[i],
                )
            )
        c = self.config
        return native.DecodePlan(
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            intermediate_size=c.intermediate_size,
            eps=self.norm.eps,
            scale=_decoder_layers(self)[0].attn.scale,
            embed=self.embed_tokens,
            rope_cos=self.rope.cos,
            rope_sin=self.rope.sin,
            final_norm=self.norm.weight,
            layers=layers,
            max_rows=rows,
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> float32 logits [N, V]."""
        return self.lm_head(hidden).float()

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy canonical tensors into the fused parameters (missing or extra names fail)."""
        try:
            load_into(self, tensors)
        except KeyError as exc:
            raise ModelLoadError(f"checkpoint is missing tensor {exc.args[0]!r}") from None


NATIVE_STEP_MAX_ROWS = 64  # rows per native decode step (quantized layers may allow fewer)


def _decode_plan_rows(model: LlamaForCausalLM) -> int | None:
    """Rows a native decode step may take (None: the model has a part it cannot run)."""
    if model.config.is_moe or model.embed_tokens.dtype not in (torch.float32, torch.bfloat16):
        return None
    rows = NATIVE_STEP_MAX_ROWS
    for layer in _decoder_layers(model):
        for module in _linears(layer):
            if isinstance(module, QuantizedLinear):
                rows = min(rows, module.max_quant_rows or rows)
            elif type(module) is not Linear:
                return None
    return rows


def _decoder_layers(model: LlamaForCausalLM) -> list[DecoderLayer]:
    return [layer for layer in model.layers if isinstance(layer, DecoderLayer)]


def _linears(layer: DecoderLayer) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """qkv, o_proj, gate_up and down of a layer with a dense feed-forward."""
    assert isinstance(layer.mlp, DenseFeedForward)
    return layer.attn.qkv, layer.attn.o_proj, layer.mlp.gate_up, layer.mlp.down


def _linear_weights(module: nn.Module) -> native.LinearWeights:
    if isinstance(module, QuantizedLinear) and module.int4_packed is not None:
        return native.LinearWeights(native.LINEAR_INT4_NATIVE, module.int4_packed, bias=module.bias)
    if isinstance(module, QuantizedLinear):
        kind = native.LINEAR_INT8 if module.bits == 8 else native.LINEAR_INT4_TORCH
        return native.LinearWeights(
            kind, module.qweight, module.scales, module.bias, module.group_size
        )
    assert isinstance(module, Linear)
    return native.LinearWeights(native.LINEAR_DENSE, module.weight, bias=module.bias)
