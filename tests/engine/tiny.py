"""Tiny random-weight models and a byte tokenizer for engine tests (built in the test)."""

from __future__ import annotations

from typing import Any

import torch

from talkloop.engine.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from talkloop.engine.llm_engine import LLMEngine
from talkloop.engine.models.llama import LlamaForCausalLM
from talkloop.engine.sampling_params import SamplingParams

BYTE_VOCAB = 256 + 4  # bytes, then <bos>=256, <eos>=257, <pad>, <unused>
EOS_ID = 257


def tiny_config(kind: str = "llama", **overrides: Any) -> ModelConfig:
    base: dict[str, Any] = dict(
        architecture=kind,
        vocab_size=BYTE_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        eos_token_ids=(EOS_ID,),
    )
    if kind == "qwen2":
        base.update(attention_bias=True)
    if kind == "mixtral":
        base.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
    if kind == "qwen2_moe":
        base.update(
            attention_bias=True,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
        )
    base.update(overrides)
    return ModelConfig(**base)


def random_tensors(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Canonical tensors with a scale that keeps activations lively but finite."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.08

    d, hd = config.hidden_size, config.head_dim
    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": w(config.vocab_size, d) * 2,
        "model.norm.weight": 1 + w(d),
    }
    if not config.tie_word_embeddings:
        t["lm_head.weight"] = w(config.vocab_size, d) * 2
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = 1 + w(d)
        t[f"{p}.post_attention_layernorm.weight"] = 1 + w(d)
        sizes = {
            "q": config.num_heads * hd,
            "k": config.num_kv_heads * hd,
            "v": config.num_kv_heads * hd,
        }
        for name, out in sizes.items():
            t[f"{p}.self_attn.{name}_proj.weight"] = w(out, d) * 3
            if config.attention_bias:
                t[f"{p}.self_attn.{name}_proj.bias"] = w(out)
        t[f"{p}.self_attn.o_proj.weight"] = w(d, config.num_heads * hd) * 3
        t.update(_ffn_tensors(config, p, w))
    return t


def _ffn_tensors(config: ModelConfig, p: str, w: Any) -> dict[str, torch.Tensor]:
    d = config.hidden_size
    if not config.is_moe:
        i = config.intermediate_size
        return {
            f"{p}.mlp.gate_proj.weight": w(i, d) * 3,
            f"{p}.mlp.up_proj.weight": w(i, d) * 3,
            f"{p}.mlp.down_proj.weight": w(d, i) * 3,
        }
    e, i = config.num_experts, config.moe_intermediate_size
    t = {
        f"{p}.mlp.gate.weight": w(e, d) * 5,
        f"{p}.mlp.experts.gate_proj": w(e, i, d) * 3,
        f"{p}.mlp.experts.up_proj": w(e, i, d) * 3,
        f"{p}.mlp.experts.down_proj": w(e, d, i) * 3,
    }
    if config.shared_expert_intermediate_size:
        s = config.shared_expert_intermediate_size
        t[f"{p}.mlp.shared_expert.gate_proj.weight"] = w(s, d) * 3
        t[f"{p}.mlp.shared_expert.up_proj.weight"] = w(s, d) * 3
        t[f"{p}.mlp.shared_expert.down_proj.weight"] = w(d, s) * 3
        t[f"{p}.mlp.shared_expert_gate.weight"] = w(1, d) * 3
    return t


def tiny_model(
    config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    model = LlamaForCausalLM(config, dtype=dtype)
    model.load_weights(random_tensors(config, seed))
    return model.eval()


class ByteDetokenizer:
    """Incremental UTF-8 decoding of byte tokens (special ids decode to nothing)."""

    def __init__(self) -> None:
        self._pending = b""

    def step(self, token_id: int) -> str:
        if token_id >= 256:
            return ""
        self._pending += bytes([token_id])
        try:
            text = self._pending.decode("utf-8")
        except UnicodeDecodeError:
            if len(self._pending) < 4:
                return ""
            text = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        return text


def encode_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def tiny_engine(
    model: LlamaForCausalLM,
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 32,
    prefix_cache: bool = True,
) -> LLMEngine:
    from talkloop.engine.attention import KVCache

    per_block = KVCache.bytes_per_block(
        model.config.num_layers,
        block_size,
        model.config.num_kv_heads,
        model.config.head_dim,
        next(model.parameters()).dtype,
    )
    config = EngineConfig(
        cache=CacheConfig(
            block_size=block_size,
            kv_cache_bytes=num_blocks * per_block,
            enable_prefix_cache=prefix_cache,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            watermark_fraction=0.0,
        ),
        num_threads=torch.get_num_threads(),
    )
    return LLMEngine(model, config, lambda params, prompt: ByteDetokenizer(), (EOS_ID,))


def run_to_completion(engine: LLMEngine) -> dict[str, list[int]]:
    """Step until idle; token ids per `request_id:index`."""
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for d in out.deltas:
                tokens.setdefault(f"{out.request_id}:{d.index}", []).extend(d.token_ids)
    return tokens


@torch.inference_mode()
def reference_greedy(
    model: LlamaForCausalLM, prompt: list[int], max_tokens: int, stop_at_eos: bool = False
) -> list[int]:
    """Naive one-sequence decoding: recompute the whole sequence every token, no cache reuse."""
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(max_tokens):
        logits = full_logits(model, tokens)[-1]
        nxt = int(logits.argmax())
        out.append(nxt)
        tokens.append(nxt)
        if stop_at_eos and nxt == EOS_ID:
            break
    return out


def full_logits(model: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    """Logits for every position of `tokens` through one contiguous prefill."""
    with torch.inference_mode():
        return model.compute_logits(model.prefill(tokens))


def greedy(max_tokens: int = 16, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def assert_no_leaked_blocks(engine: LLMEngine) -> None:
    """Every block is free or held only by the prefix cache with no users."""
    blocks = engine.block_manager
    assert blocks.num_available_blocks == blocks.num_blocks
    if blocks.cache is not None:
        freed = blocks.cache.reset()
        blocks._free.extend(freed)
        assert blocks.cache.num_cached_blocks == 0
    assert blocks.num_free_blocks == blocks.num_blocks
    assert sorted(blocks._free) == list(range(blocks.num_blocks))
