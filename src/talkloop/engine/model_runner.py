"""Turns a `SchedulerOutput` into tensors, runs the model, and samples the next tokens.

Owns the model and the KV cache pools. Flattened step layout: prefill chunks (one per
sequence) first, then all single-token decodes as one padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from talkloop.engine.attention import AttentionMetadata, KVCache, PrefillChunk
from talkloop.engine.block_manager import BlockManager
from talkloop.engine.models.llama import LlamaForCausalLM
from talkloop.engine.sampler import SamplerOutput, SamplingBatch, sample
from talkloop.engine.scheduler import ScheduledSeq, SchedulerOutput
from talkloop.engine.sequence import Sequence


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logit_rows: torch.Tensor  # [N] rows of the hidden states to sample from
    sampled_seqs: tuple[Sequence, ...]
    verify_rows: torch.Tensor  # [M] rows scored for speculative verification
    verify_seqs: tuple[tuple[Sequence, int], ...]  # (sequence, number of its rows: k + 1)


@dataclass(frozen=True)
class RunnerOutput:
    sampled_seqs: tuple[Sequence, ...]
    sampled: SamplerOutput | None
    verify_seqs: tuple[tuple[Sequence, int], ...]
    verify_logits: torch.Tensor | None  # [M, V] float32, rows grouped per sequence


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

    @torch.inference_mode()
    def run(self, output: SchedulerOutput) -> RunnerOutput:
        """Compute the scheduled tokens; sample where due, score drafts where speculating."""
        inputs = self.prepare(output)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)
        sampled = None
        if inputs.sampled_seqs:
            logits = self.model.compute_logits(hidden[inputs.logit_rows])
            sampled = sample(logits, build_sampling_batch(inputs.sampled_seqs))
        verify_logits = None
        if inputs.verify_seqs:
            verify_logits = self.model.compute_logits(hidden[inputs.verify_rows])
        return RunnerOutput(inputs.sampled_seqs, sampled, inputs.verify_seqs, verify_logits)

    def prepare(self, output: SchedulerOutput) -> StepInputs:
        prefills = [s for s in output.scheduled if s.num_new_tokens > 1]
        decodes = [s for s in output.scheduled if s.num_new_tokens == 1]
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        chunks: list[PrefillChunk] = []
        logit_rows: list[int] = []
        sampled: list[Sequence] = []
        verify_rows: list[int] = []
        verifying: list[tuple[Sequence, int]] = []
        for item in prefills + decodes:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            if item.num_new_tokens > 1:
                chunks.append(self._chunk(item, len(token_ids)))
            token_ids.extend(seq.token_ids[start : end - item.num_draft_tokens])
            token_ids.extend(seq.draft_token_ids[: item.num_draft_tokens])
            positions.extend(range(start, end))
            slots.extend(self.block_manager.slot(seq, p) for p in range(start, end))
            if item.num_draft_tokens:
                num_rows = item.num_draft_tokens + 1  # the last real token and each draft
                verify_rows.extend(range(len(token_ids) - num_rows, len(token_ids)))
                verifying.append((seq, num_rows))
            elif item.samples:
                logit_rows.append(len(token_ids) - 1)
                sampled.append(seq)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            prefills=tuple(chunks),
            num_prefill_tokens=sum(c.num_tokens for c in chunks),
            **self._decode_metadata(decodes),
        )
        return StepInputs(
            self._tensor(token_ids),
            self._tensor(positions),
            meta,
            self._tensor(logit_rows),
            tuple(sampled),
            self._tensor(verify_rows),
            tuple(verifying),
        )

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _chunk(self, item: ScheduledSeq, token_start: int) -> PrefillChunk:
        context_len = item.seq.num_computed_tokens + item.num_new_tokens
        num_blocks = -(-context_len // self.block_manager.block_size)
        table = self._tensor(item.seq.block_ids[:num_blocks])
        return PrefillChunk(token_start, item.num_new_tokens, context_len, table)

    def _decode_metadata(self, decodes: list[ScheduledSeq]) -> dict[str, torch.Tensor | None]:
        block_size = self.block_manager.block_size
        context_lens = [s.seq.num_computed_tokens + 1 for s in decodes]
        max_blocks = max((-(-n // block_size) for n in context_lens), default=0)
        tables = [s.seq.block_ids[:max_blocks] for s in decodes]
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        lens = self._tensor(context_lens)
        bias = None
        if decodes:
            key_positions = torch.arange(max_blocks * block_size, device=self.device)
            beyond = key_positions.unsqueeze(0) >= lens.unsqueeze(1)
            bias = torch.zeros(beyond.shape, dtype=self.kv_cache.dtype, device=self.device)
            bias = bias.masked_fill_(beyond, float("-inf")).view(len(decodes), 1, 1, -1)
        return {
            "decode_block_tables": self._tensor(padded).view(len(decodes), max_blocks),
            "decode_context_lens": lens,
            "decode_bias": bias,
        }


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
