"""Block accounting for the paged KV cache: a free list and per-sequence block tables.

Knows nothing about tensors: block ids index the pools in `attention.KVCache`. Every block is
either free or owned by exactly one sequence (NOTE: the prefix cache will add sharing).
"""

from __future__ import annotations

from collections import deque

from talkloop.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` must gain so that `num_tokens` tokens fit in its cache."""
        total = -(-num_tokens // self.block_size)
        return max(0, total - len(seq.block_ids))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table to hold `num_tokens` tokens (caller checked can_allocate)."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {needed}, have {len(self._free)}")
        seq.block_ids.extend(self._free.popleft() for _ in range(needed))

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_ids)
        seq.block_ids = []

    def slot(self, seq: Sequence, position: int) -> int:
        block = seq.block_ids[position // self.block_size]
        return block * self.block_size + position % self.block_size
