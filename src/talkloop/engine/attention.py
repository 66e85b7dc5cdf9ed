"""Attention over the paged KV cache.

The runner flattens a step's tokens: prefill chunks first (one sequence each, any length),
then decode tokens (one per sequence). New keys/values are written to their cache slots, then
prefill chunks attend sequence by sequence and decodes attend as one padded batch; decodes
whose sequences share leading blocks (one persona prefix) read those blocks once per group
(see `shared_prefix`). Plain PyTorch, so the same code runs on CPU and CUDA; on the CPU,
decodes use the native kernel when it is built (`native`), which reads blocks in place, and so
do prefills of a bf16 cache where the CPU has AVX-512 BF16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from talkloop.engine import native


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence's chunk of new tokens, attending to its whole context so far."""

    token_start: int  # index of the chunk's first token in the flattened step
    num_tokens: int
    context_len: int  # tokens in cache after this step (cached + this chunk)
    block_table: torch.Tensor  # [num_blocks] int64, covering context_len


@dataclass(frozen=True)
class SharedPrefix:
    """Decode rows whose sequences begin with the same blocks, attended to once for all."""

    rows: torch.Tensor  # [n] int64: rows of the decode batch
    block_table: torch.Tensor  # [P] int64: the shared leading blocks (all full)


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) per token
    prefills: tuple[PrefillChunk, ...]
    num_prefill_tokens: int
    # Decode rows attend to their blocks from `decode_block_tables` (after the blocks of their
    # `decode_shared` group, if any; `decode_context_lens` counts the tokens in those tables).
    decode_block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    decode_context_lens: torch.Tensor  # [B] int64
    decode_bias: torch.Tensor | None  # [B, max_blocks * block_size]: 0 attend, -inf not
    decode_shared: tuple[SharedPrefix, ...] = ()
    decode_native: bool = False  # decodes read the cache in place (native CPU kernel)
    prefill_native: bool = False  # prefills too (native bf16 kernel, `native.prefill_attention`)


class KVCache:
    """Per-layer key and value pools, allocated once, head-major: [Hkv, num_blocks, block_size, D].

    Head-major so that gathering a sequence's blocks yields [Hkv, L, D] directly: attention
    then runs as batched matmuls over (head, sequence) with no further copy.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_kv_heads, num_blocks, block_size, head_dim)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element_bytes = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element_bytes


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] for the step's new tokens -> output [T, H, D]."""
    num_kv_heads, _, _, head_dim = key_cache.shape
    key_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
    value_cache.view(num_kv_heads, -1, head_dim).index_copy_(
        1, meta.slot_mapping, v.transpose(0, 1)
    )
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for chunk in meta.prefills:
        rows = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
        if meta.prefill_native:  # written in place, from the blocks in place
            native.prefill_attention(
                out[rows],
                q[rows],
                key_cache,
                value_cache,
                chunk.block_table,
                chunk.context_len,
                scale,
            )
        else:
            out[rows] = _prefill_attention(q[rows], key_cache, value_cache, chunk, scale)
    if meta.decode_context_lens.numel():
        rows = slice(meta.num_prefill_tokens, q.shape[0])
        out[rows] = _decode_attention(q[rows], key_cache, value_cache, meta, scale)
    return out


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[Hkv, num_blocks, block_size, D] and tables [...] -> [Hkv, ..., block_size * D], contiguous.

    NOTE: `index_select` over flattened blocks is about 2x faster on CPU than advanced indexing.
    """
    num_kv_heads, num_blocks, block_size, head_dim = cache.shape
    flat = cache.view(num_kv_heads, num_blocks, block_size * head_dim)
    picked = flat.index_select(1, block_tables.reshape(-1))
    return picked.view(num_kv_heads, *block_tables.shape, block_size * head_dim)


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """Attention's matmuls run in float32 on the CPU (faster there than bf16), else in q's."""
    return torch.float32 if q.device.type == "cpu" else q.dtype


def _prefill_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    chunk: PrefillChunk,
    scale: float,
) -> torch.Tensor:
    head_dim = key_cache.shape[-1]
    length = chunk.context_len
    keys = _gather(key_cache, chunk.block_table).view(key_cache.shape[0], -1, head_dim)[:, :length]
    values = _gather(value_cache, chunk.block_table).view(keys.shape[0], -1, head_dim)[:, :length]
    # SDPA in `_compute_dtype`: torch's CPU flash kernel runs 1.7x faster in float32 than in
    # bf16 (8.5 vs 14.6 ms for a 1,024-token causal prefill of 9 heads, measured here), far
    # more than the casts cost. Its GQA mode keeps the flash kernel (torch >= 2.13): no repeat.
    compute = _compute_dtype(q)
    query = q.transpose(0, 1).unsqueeze(0).to(compute)  # [1, H, n, D]
    keys = keys.unsqueeze(0).to(compute)  # [1, Hkv, L, D]
    values = values.unsqueeze(0).to(compute)
    num_cached = chunk.context_len - chunk.num_tokens
    gqa = query.shape[1] != keys.shape[1]
    if num_cached < chunk.num_tokens:
        # Causal from the cached keys on: SDPA's causal mode (top-left aligned) is exact once
        # `num_cached` dummy queries stand before the new ones, and it skips the blocks above
        # the diagonal. A chat turn almost always follows a cached template prefix: a dense
        # lower-right mask instead cost 1.4x (16.0 vs 11.2 ms for 1,008 new tokens after 16
        # cached, measured here). Padding computes (P + N)^2 / 2 scores, the mask N (P + N):
        # fewer while P < N.
        if num_cached:
            pad = query.new_zeros(1, query.shape[1], num_cached, query.shape[-1])
            query = torch.cat([pad, query], dim=2)
        out = F.scaled_dot_product_attention(
            query, keys, values, is_causal=True, scale=scale, enable_gqa=gqa
        )[:, :, num_cached:]
        return out.to(q.dtype)[0].transpose(0, 1)
    # Query i (absolute position num_cached + i) sees keys 0..num_cached + i.
    rows = torch.arange(chunk.num_tokens, device=q.device).unsqueeze(1) + num_cached
    mask = torch.arange(chunk.context_len, device=q.device).unsqueeze(0) <= rows
    out = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa
    )
    return out.to(q.dtype)[0].transpose(0, 1)


def _decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    tables = meta.decode_block_tables  # [B, max_blocks]
    batch = tables.shape[0]
    num_kv_heads, _, _, head_dim = key_cache.shape
    group = q.shape[1] // num_kv_heads
    if meta.decode_native and not meta.decode_shared:
        return native.decode_attention(
            q, key_cache, value_cache, tables, meta.decode_context_lens, scale
        )
    # q head h reads kv head h // group: [B, H, D] -> [Hkv, B, G, D]
    query = q.view(batch, num_kv_heads, group, head_dim).transpose(0, 1)
    if meta.decode_native:  # each row's own blocks in place; shared blocks below
        own, own_lse = native.decode_attention_lse(
            q, key_cache, value_cache, tables, meta.decode_context_lens, scale
        )
        out = own.view(batch, num_kv_heads, group, head_dim).transpose(0, 1)
        lse = own_lse.view(batch, num_kv_heads, group, 1).transpose(0, 1)
    else:
        # NOTE: for one query token SDPA's CPU kernels are ~20x slower than grouped matmuls.
        keys = _gather(key_cache, tables).view(num_kv_heads, batch, -1, head_dim)  # [Hkv,B,L,D]
        values = _gather(value_cache, tables).view(num_kv_heads, batch, -1, head_dim)
        scores = torch.matmul(query, keys.transpose(-1, -2)).float().mul_(scale)  # [Hkv,B,G,L]
        if meta.decode_bias is not None:  # 0 where attended, -inf past each context length
            scores.add_(meta.decode_bias.view(1, batch, 1, -1))
        if not meta.decode_shared:
            probs = scores.softmax(dim=-1).to(values.dtype)
            out = torch.matmul(probs, values)  # [Hkv, B, G, D]
            return out.transpose(0, 1).reshape(batch, -1, head_dim)  # [B, H, D]
        out, lse = _attend_with_lse(scores, values)
    out = out.contiguous()
    lse = lse.contiguous()
    # Shared blocks in `_compute_dtype`: these small batched matmuls run ~1.6x faster in
    # float32 than in bf16 on the CPU (78 vs 128 us for 48 queries x 768 keys, measured here).
    compute = _compute_dtype(q)
    for shared in meta.decode_shared:
        rows, num = shared.rows, shared.rows.numel()
        # Every member's queries against the shared blocks, read once: [Hkv, n * G, Ls].
        stacked = query.index_select(1, rows).reshape(num_kv_heads, num * group, head_dim)
        stacked = stacked.to(compute)
        shared_keys = _gather(key_cache, shared.block_table).view(num_kv_heads, -1, head_dim)
        shared_values = _gather(value_cache, shared.block_table).view(num_kv_heads, -1, head_dim)
        shared_keys, shared_values = shared_keys.to(compute), shared_values.to(compute)
        shared_scores = torch.matmul(stacked, shared_keys.transpose(-1, -2)).float().mul_(scale)
        shared_out, shared_lse = _attend_with_lse(shared_scores, shared_values)
        merged = _merge(
            shared_out.view(num_kv_heads, num, group, head_dim),
            shared_lse.view(num_kv_heads, num, group, 1),
            out.index_select(1, rows),
            lse.index_select(1, rows),
        )
        out.index_copy_(1, rows, merged)
    return out.to(q.dtype).transpose(0, 1).reshape(batch, -1, head_dim)


def _attend_with_lse(
    scores: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scores) @ values in float32, and each row's log-sum-exp (scores is consumed)."""
    peak = scores.amax(dim=-1, keepdim=True)
    weights = scores.sub_(peak).exp_()
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights.to(values.dtype), values).float().div_(total)
    return out, peak.add_(total.log_())


def _merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Attention over keys A and B together, from attention over each and their log-sum-exps."""
    peak = torch.maximum(lse_a, lse_b)
    weight_a = (lse_a - peak).exp_()
    weight_b = (lse_b - peak).exp_()
    return (out_a * weight_a + out_b * weight_b).div_(weight_a + weight_b)
