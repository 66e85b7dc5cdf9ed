"""Block accounting for the paged KV cache: free list, block tables, prefix-cache sharing.

Knows nothing about tensors: block ids index the pools in `attention.KVCache`. A block is
free, private to one sequence, or owned by the radix prefix cache (shared, reference counted).
NOTE: a sequence's block table starts with its cached (shared) blocks, then private ones;
shared blocks are always full and never written again.
"""

from __future__ import annotations

from collections import deque

from talkloop.engine.prefix_cache import RadixCache
from talkloop.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self.cache = RadixCache(block_size) if enable_prefix_cache else None

    @property
    def num_free_blocks(self) -> int:
        """Blocks on the free list (not counting evictable cached blocks)."""
        return len(self._free)

    @property
    def num_available_blocks(self) -> int:
        """Free blocks plus cached blocks nobody uses (evicted on demand)."""
        evictable = self.cache.num_evictable_blocks if self.cache else 0
        return len(self._free) + evictable

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` must gain so that `num_tokens` tokens fit in its cache."""
        total = -(-num_tokens // self.block_size)
        return max(0, total - len(seq.block_ids))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_available_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table to hold `num_tokens` tokens (caller checked can_allocate)."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self._free) and self.cache is not None:
            self._free.extend(self.cache.evict(needed - len(self._free)))
        if needed > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {needed}, have {len(self._free)}")
        seq.block_ids.extend(self._free.popleft() for _ in range(needed))

    def free(self, seq: Sequence) -> None:
        """Release everything `seq` holds: shared blocks lose a reference, private ones free."""
        num_shared = len(seq.cache_nodes)
        if self.cache is not None and num_shared:
            self.cache.release(seq.cache_nodes)
        self._free.extend(seq.block_ids[num_shared:])
        seq.block_ids = []
        seq.cache_nodes = []
        seq.draft_num_computed = 0  # a draft model's KV went with the blocks

    def slot(self, seq: Sequence, position: int) -> int:
        block = seq.block_ids[position // self.block_size]
        return block * self.block_size + position % self.block_size

    # ---- prefix cache ---------------------------------------------------------------------
    def peek_cached_tokens(self, seq: Sequence) -> int:
        """How many of `seq`'s tokens the cache would supply (no side effects)."""
        if self.cache is None or seq.block_ids:
            return 0
        return len(self.cache.match(seq.token_ids, self._max_match(seq), touch=False).nodes) * (
            self.block_size
        )

    def match_prefix(self, seq: Sequence) -> None:
        """Start a block-less sequence from the longest cached prefix of its tokens."""
        if self.cache is None or seq.block_ids:
            return
        result = self.cache.match(seq.token_ids, self._max_match(seq))
        self.cache.acquire(result.nodes)
        seq.cache_nodes = list(result.nodes)
        seq.block_ids = result.block_ids
        seq.num_computed_tokens = len(result.nodes) * self.block_size
        if seq.num_preemptions == 0:  # bill and count the first admission only
            seq.num_cached_tokens = seq.num_computed_tokens
            self.cache.record_query(seq.num_tokens, seq.num_computed_tokens)

    def _max_match(self, seq: Sequence) -> int:
        # At least one token must be computed, so that there are logits to sample from.
        return (seq.num_tokens - 1) // self.block_size

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Hand `seq`'s newly completed blocks to the prefix cache (after a step ran)."""
        if self.cache is None:
            return
        num_full = seq.num_computed_tokens // self.block_size
        tokens = seq.token_ids
        for i in range(len(seq.cache_nodes), num_full):
            key = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            parent = seq.cache_nodes[-1] if seq.cache_nodes else None
            node = self.cache.insert(parent, key, seq.block_ids[i])
            if node.block_id != seq.block_ids[i]:
                # Another sequence cached the same tokens first: share its block.
                self._free.append(seq.block_ids[i])
                seq.block_ids[i] = node.block_id
            self.cache.acquire([node])
            seq.cache_nodes.append(node)
