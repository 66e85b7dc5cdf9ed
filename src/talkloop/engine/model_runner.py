"""Turns a `SchedulerOutput` into tensors, runs the model, and samples the next tokens.

Owns the model and the KV cache pools. Flattened step layout: prefill chunks (one per
sequence) first, then all single-token decodes as one padded batch. A step of only a few
decode and speculative rows (single-stream chat, verification) runs as one native call
instead (`LlamaForCausalLM.decode_plan`): there, per-op dispatch costs more than the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from talkloop.engine import native
from talkloop.engine.attention import AttentionMetadata, KVCache, PrefillChunk, SharedPrefix
from talkloop.engine.block_manager import BlockManager
from talkloop.engine.models.llama import LlamaForCausalLM
from talkloop.engine.sampler import SamplerOutput, SamplingBatch, sample
from talkloop.engine.scheduler import SchedulerOutput
from talkloop.engine.sequence import Sequence
from talkloop.engine.shared_prefix import MIN_NATIVE_MEMBERS, shared_prefix_groups


@dataclass(frozen=True)
class TokenChunk:
    """Tokens of one sequence to run through the model at positions start.. (plain data)."""

    seq: Sequence
    start: int
    token_ids: list[int]
    num_logit_rows: int  # rows at the chunk's end to turn into logits (0, 1 or k + 1)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(frozen=True)
class RunnerOutput:
    sampled_seqs: tuple[Sequence, ...]
    sampled: SamplerOutput | None
    verify_seqs: tuple[tuple[Sequence, int], ...]  # (sequence, its rows: k + 1)
    verify_logits: torch.Tensor | None  # [M, V] float32, rows grouped per sequence


def chunks_for(output: SchedulerOutput) -> list[TokenChunk]:
    """The target model's chunks: scheduled tokens plus any drafts to verify."""
    chunks = []
    for item in output.scheduled:
        seq, start = item.seq, item.seq.num_computed_tokens
        real = seq.token_ids[start : start + item.num_new_tokens - item.num_draft_tokens]
        drafts = seq.draft_token_ids[: item.num_draft_tokens]
        rows = len(drafts) + 1 if drafts else int(item.samples)
        chunks.append(TokenChunk(seq, start, real + drafts, rows))
    return chunks


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: KVCache,
        block_manager: BlockManager,
        device: torch.device | str,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.device = torch.device(device)
        head_dim = kv_cache.keys[0].shape[-1] if kv_cache.keys else 0
        # The native kernel reads each row's own blocks in place (no gather into a batch).
        self.native_decode = native.decode_attention_supported(
            self.device, kv_cache.dtype, head_dim
        )
        # Prefill attention in bf16 from the blocks in place (2-4x SDPA's, which gathers them).
        self.native_prefill = native.prefill_attention_supported(
            self.device, kv_cache.dtype, head_dim
        )
        # Small steps of single-token decodes and speculative rows run as one native call.
        self.decode_plan = model.decode_plan(kv_cache) if self.native_decode else None

    @torch.inference_mode()
    def run(self, output: SchedulerOutput) -> RunnerOutput:
        """Compute the scheduled tokens; sample where due, score drafts where speculating."""
        chunks = chunks_for(output)
        logits = self.forward(chunks)
        sampled_seqs = tuple(c.seq for c in chunks if c.num_logit_rows == 1 and not _drafting(c))
        verify = tuple((c.seq, c.num_logit_rows) for c in chunks if _drafting(c))
        sample_rows: list[int] = []
        verify_rows: list[int] = []
        row = 0
        for c in chunks:
            span = range(row, row + c.num_logit_rows)
            (verify_rows if _drafting(c) else sample_rows).extend(span)
            row += c.num_logit_rows
        sampled = None
        if sampled_seqs:
            batch = build_sampling_batch(sampled_seqs)
            sample_logits = self._rows(logits, sample_rows)
            if any(seq.grammar is not None for seq in sampled_seqs):
                from talkloop.engine.structured.bitmask import apply_grammar_masks

                apply_grammar_masks(sample_logits, [seq.grammar for seq in sampled_seqs])
            sampled = sample(sample_logits, batch)
        verify_logits = self._rows(logits, verify_rows) if verify else None
        return RunnerOutput(sampled_seqs, sampled, verify, verify_logits)

    @torch.inference_mode()
    def forward(self, chunks: list[TokenChunk]) -> torch.Tensor:
        """Run `chunks` (writing their KV); logits [sum of num_logit_rows, V] in chunk order."""
        if self._fits_decode_plan(chunks):
            return self.model.compute_logits(self._decode_step(chunks))
        input_ids, positions, meta, rows = self.prepare(chunks)
        hidden = self.model(input_ids, positions, self.kv_cache, meta)
        return self.model.compute_logits(hidden[rows])

    def _fits_decode_plan(self, chunks: list[TokenChunk]) -> bool:
        """Whether the native step serves `chunks`: single-token decodes and speculative
        rows (prompt chunks keep the prefill path and its numerics), few enough rows."""
        plan = self.decode_plan
        if plan is None or not chunks:
            return False
        if any(len(c.token_ids) > 1 and not _drafting(c) for c in chunks):
            return False
        return sum(len(c.token_ids) for c in chunks) <= plan.max_rows

    def _decode_step(self, chunks: list[TokenChunk]) -> torch.Tensor:
        """Every token of `chunks` as its own row, attending to its sequence's cache up to and
        including itself (all rows' keys are written first): hidden states of the logit rows."""
        assert self.decode_plan is not None
        block_size = self.block_manager.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        logit_rows: list[int] = []
        for chunk in chunks:
            table = chunk.seq.block_ids[: -(-chunk.end // block_size)]
            for position in range(chunk.start, chunk.end):
                positions.append(position)
                slots.append(self.block_manager.slot(chunk.seq, position))
                tables.append(table)
            token_ids.extend(chunk.token_ids)
            logit_rows.extend(range(len(token_ids) - chunk.num_logit_rows, len(token_ids)))
        hidden = self.decode_plan.step(
            self._tensor(token_ids),
            self._tensor(positions),
            self._tensor(slots),
            self._tables(tables),
            self._tensor([p + 1 for p in positions]),
        )
        if len(logit_rows) == len(token_ids):
            return hidden
        return hidden[self._tensor(logit_rows)]

    def prepare(
        self, chunks: list[TokenChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        # Multi-token chunks first (attended one by one), then single tokens as one batch.
        order = [c for c in chunks if len(c.token_ids) > 1] + [
            c for c in chunks if len(c.token_ids) == 1
        ]
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillChunk] = []
        rows_of: dict[int, list[int]] = {}
        for chunk in order:
            if len(chunk.token_ids) > 1:
                prefills.append(self._prefill_chunk(chunk, len(token_ids)))
            token_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, chunk.end))
            slots.extend(
                self.block_manager.slot(chunk.seq, p) for p in range(chunk.start, chunk.end)
            )
            rows_of[id(chunk)] = list(range(len(token_ids) - chunk.num_logit_rows, len(token_ids)))
        decodes = [c for c in order if len(c.token_ids) == 1]
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            prefills=tuple(prefills),
            num_prefill_tokens=sum(p.num_tokens for p in prefills),
            prefill_native=self.native_prefill,
            **self._decode_metadata(decodes),
        )
        rows = [r for chunk in chunks for r in rows_of[id(chunk)]]
        return self._tensor(token_ids), self._tensor(positions), meta, self._tensor(rows)

    def _rows(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """`logits[rows]`: a view when they are all rows in order (batched decode), else
        `index_select` (advanced indexing copies [N, V] floats ~5x slower on CPU)."""
        if len(rows) == logits.shape[0] and rows == list(range(len(rows))):
            return logits
        return logits.index_select(0, self._tensor(rows))

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _tables(self, tables: list[list[int]]) -> torch.Tensor:
        """Block tables padded with block 0 to the longest: [len(tables), width] int64."""
        width = max((len(t) for t in tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(padded, dtype=torch.int64, device=self.device).view(len(tables), width)

    def _prefill_chunk(self, chunk: TokenChunk, token_start: int) -> PrefillChunk:
        num_blocks = -(-chunk.end // self.block_manager.block_size)
        table = self._tensor(chunk.seq.block_ids[:num_blocks])
        return PrefillChunk(token_start, len(chunk.token_ids), chunk.end, table)

    def _decode_metadata(self, decodes: list[TokenChunk]) -> dict[str, Any]:
        """Decode tables and lengths past each row's shared-prefix group (if it has one)."""
        block_size = self.block_manager.block_size
        context_lens = [c.end for c in decodes]
        tables = [
            c.seq.block_ids[: -(-n // block_size)]
            for c, n in zip(decodes, context_lens, strict=True)
        ]
        skipped = [0] * len(decodes)  # leading blocks read through a shared group instead
        shared: list[SharedPrefix] = []
        if len(decodes) > 1:
            shareable = [(n - 1) // block_size for n in context_lens]
            min_members = MIN_NATIVE_MEMBERS if self.native_decode else 2
            for group in shared_prefix_groups(tables, shareable, min_members=min_members):
                members = list(group.members)
                for m in members:
                    skipped[m] = group.num_blocks
                leading = tables[members[0]][: group.num_blocks]
                shared.append(SharedPrefix(self._tensor(members), self._tensor(leading)))
        own = [t[s:] for t, s in zip(tables, skipped, strict=True)]
        own_lens = [n - s * block_size for n, s in zip(context_lens, skipped, strict=True)]
        block_tables = self._tables(own)
        max_blocks = block_tables.shape[1]
        lens = self._tensor(own_lens)
        bias = None
        if decodes and not self.native_decode:  # the kernel stops at each row's length itself
            key_positions = torch.arange(max_blocks * block_size, device=self.device)
            beyond = key_positions.unsqueeze(0) >= lens.unsqueeze(1)
            bias = torch.zeros(beyond.shape, dtype=torch.float32, device=self.device)
            bias = bias.masked_fill_(beyond, float("-inf"))
        return {
            "decode_block_tables": block_tables,
            "decode_context_lens": lens,
            "decode_bias": bias,
            "decode_shared": tuple(shared),
            "decode_native": self.native_decode,
        }


def _drafting(chunk: TokenChunk) -> bool:
    """Chunks carrying drafts score k + 1 >= 2 rows; plain ones score at most one."""
    return chunk.num_logit_rows > 1


def _padded(rows: list[list[int]]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int64).view(
        len(rows), width
    )


def build_sampling_batch(seqs: tuple[Sequence, ...]) -> SamplingBatch:
    params = [s.params for s in seqs]

    def floats(name: str) -> torch.Tensor:
        return torch.tensor([getattr(p, name) for p in params], dtype=torch.float32)

    needs_penalty = any(
        p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params
    )
    bias = [(row, t, b) for row, p in enumerate(params) for t, b in p.logit_bias.items()]
    wants_logprobs = [p.logprobs for p in params if p.logprobs is not None]
    return SamplingBatch(
        temperatures=floats("temperature"),
        top_ks=torch.tensor([p.top_k for p in params], dtype=torch.int64),
        top_ps=floats("top_p"),
        min_ps=floats("min_p"),
        repetition_penalties=floats("repetition_penalty"),
        presence_penalties=floats("presence_penalty"),
        frequency_penalties=floats("frequency_penalty"),
        prompt_token_ids=_padded([s.prompt_token_ids for s in seqs]) if needs_penalty else None,
        output_token_ids=_padded([s.output_token_ids for s in seqs]) if needs_penalty else None,
        bias_rows=torch.tensor([b[0] for b in bias]) if bias else None,
        bias_token_ids=torch.tensor([b[1] for b in bias]) if bias else None,
        bias_values=torch.tensor([b[2] for b in bias], dtype=torch.float32) if bias else None,
        generators=tuple(s.generator for s in seqs),
        max_num_logprobs=max(wants_logprobs) if wants_logprobs else None,
    )
