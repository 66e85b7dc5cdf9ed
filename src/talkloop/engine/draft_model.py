"""A draft model proposer: a small model sharing the target's tokenizer proposes k tokens.

Its KV lives in pools of its own, addressed through the target's block tables (same block
ids, same slots), so it needs no allocator and follows preemption and the prefix cache for
free. It catches up lazily: each proposal first runs every token it has not seen yet.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf

import torch

from talkloop.engine.attention import KVCache
from talkloop.engine.block_manager import BlockManager
from talkloop.engine.errors import ModelLoadError
from talkloop.engine.model_runner import ModelRunner, TokenChunk, build_sampling_batch
from talkloop.engine.models.llama import LlamaForCausalLM
from talkloop.engine.sampler import target_probs
from talkloop.engine.sequence import Sequence
from talkloop.engine.speculative import Draft


class DraftModelProposer:
    def __init__(
        self,
        draft: LlamaForCausalLM,
        target_vocab_size: int,
        block_manager: BlockManager,
        device: str = "cpu",
    ) -> None:
        config = draft.config
        if config.vocab_size != target_vocab_size:
            raise ModelLoadError(
                f"draft model vocab ({config.vocab_size}) differs from the target's "
                f"({target_vocab_size}); a draft must share the target's tokenizer"
            )
        dtype = next(draft.parameters()).dtype
        cache = KVCache(
            config.num_layers,
            block_manager.num_blocks,
            block_manager.block_size,
            config.num_kv_heads,
            config.head_dim,
            dtype,
            device,
        )
        self.runner = ModelRunner(draft, cache, block_manager, device)

    @torch.inference_mode()
    def propose(self, seqs: SequenceOf[Sequence], num_tokens: SequenceOf[int]) -> list[Draft]:
        tokens: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        chunks = [self._catch_up(seq) for seq in seqs]
        active = list(range(len(seqs)))
        for step in range(max(num_tokens, default=0)):
            batch = build_sampling_batch(tuple(seqs[i] for i in active))
            q = target_probs(self.runner.forward(chunks), batch)
            for row, i in enumerate(active):
                token = _pick(q[row], seqs[i])
                tokens[i].append(token)
                probs[i].append(q[row])
            active = [i for i in active if len(tokens[i]) < num_tokens[i]]
            chunks = [
                TokenChunk(seqs[i], seqs[i].num_tokens + step, [tokens[i][-1]], 1) for i in active
            ]
            if not chunks:
                break
        for seq, drafted in zip(seqs, tokens, strict=True):
            # KV is now valid up to the position before the last draft.
            seq.draft_num_computed = seq.num_tokens + len(drafted) - 1
        return [
            Draft(t, None if seq.params.greedy else torch.stack(p))
            for seq, t, p in zip(seqs, tokens, probs, strict=True)
        ]

    def _catch_up(self, seq: Sequence) -> TokenChunk:
        # Tokens before num_computed_tokens are final; the draft's KV is valid up to
        # draft_num_computed (rejected drafts beyond it are overwritten now).
        start = min(seq.draft_num_computed, seq.num_computed_tokens)
        return TokenChunk(seq, start, seq.token_ids[start:], 1)


def _pick(q: torch.Tensor, seq: Sequence) -> int:
    if seq.params.greedy:
        return int(q.argmax())
    return int(torch.multinomial(q, 1, generator=seq.generator))
