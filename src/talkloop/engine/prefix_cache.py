"""Radix prefix cache: a tree over token ids whose nodes own full KV blocks.

Each edge is one block of `block_size` token ids (SGLang's RadixAttention with a page size),
so a persona prefix is computed once for every user of a character, and turn N of a chat
reuses turn N-1 including the tokens the engine generated. Nodes are reference counted by the
sequences using them; unreferenced leaves are evicted by a small policy object (LRU here).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(eq=False)
class RadixNode:
    tokens: tuple[int, ...]
    block_id: int
    parent: RadixNode | None
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict)
    ref_count: int = 0
    last_access: int = 0
    evicted: bool = False


class EvictionPolicy(Protocol):
    def priority(self, node: RadixNode) -> float:
        """Lower is evicted first."""
        ...


class LRUPolicy:
    def priority(self, node: RadixNode) -> float:
        return float(node.last_access)


@dataclass(frozen=True)
class MatchResult:
    nodes: tuple[RadixNode, ...]

    @property
    def block_ids(self) -> list[int]:
        return [node.block_id for node in self.nodes]


class RadixCache:
    def __init__(self, block_size: int, policy: EvictionPolicy | None = None) -> None:
        self.block_size = block_size
        self.policy = policy or LRUPolicy()
        self.root = RadixNode((), -1, None)
        self._clock = itertools.count(1)
        self._heap: list[tuple[float, int, RadixNode]] = []
        self._tiebreak = itertools.count()
        self.num_cached_blocks = 0
        self.num_evictable_blocks = 0
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

    # ---- lookup ---------------------------------------------------------------------------
    def match(self, token_ids: SequenceOf[int], max_blocks: int, touch: bool = True) -> MatchResult:
        """Longest cached path of full blocks for `token_ids`, at most `max_blocks` long.

        `touch=False` peeks (for scheduling decisions) without refreshing recency."""
        node, nodes = self.root, []
        now = next(self._clock) if touch else 0
        for i in range(min(max_blocks, len(token_ids) // self.block_size)):
            key = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            child = node.children.get(key)
            if child is None:
                break
            if touch:
                child.last_access = now
            nodes.append(child)
            node = child
        return MatchResult(tuple(nodes))

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.num_query_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens

    # ---- references -------------------------------------------------------------------------
    def acquire(self, nodes: SequenceOf[RadixNode]) -> None:
        for node in nodes:
            if node.ref_count == 0:
                self.num_evictable_blocks -= 1
            node.ref_count += 1

    def release(self, nodes: SequenceOf[RadixNode]) -> None:
        now = next(self._clock)
        for node in reversed(nodes):
            node.ref_count -= 1
            node.last_access = now
            if node.ref_count == 0:
                self.num_evictable_blocks += 1
                self._push_if_leaf(node)

    # ---- insertion --------------------------------------------------------------------------
    def insert(self, parent: RadixNode | None, tokens: tuple[int, ...], block_id: int) -> RadixNode:
        """Child of `parent` for `tokens`, owning `block_id` unless one existed (then the
        caller's block is a duplicate and the existing node is returned). Not yet acquired."""
        parent = parent or self.root
        child = parent.children.get(tokens)
        if child is not None:
            return child
        child = RadixNode(tokens, block_id, parent, last_access=next(self._clock))
        parent.children[tokens] = child
        self.num_cached_blocks += 1
        self.num_evictable_blocks += 1  # ref 0 until the caller acquires it
        return child

    # ---- eviction ----------------------------------------------------------------------------
    def evict(self, num_blocks: int) -> list[int]:
        """Free up to `num_blocks` blocks from unreferenced leaves, lowest priority first."""
        freed = self._evict_from_heap(num_blocks)
        if len(freed) < num_blocks:
            self._rebuild_heap()  # entries go stale when nodes are touched again
            freed += self._evict_from_heap(num_blocks - len(freed))
        return freed

    def _evict_from_heap(self, num_blocks: int) -> list[int]:
        freed: list[int] = []
        while len(freed) < num_blocks and self._heap:
            priority, _, node = heapq.heappop(self._heap)
            if not self._is_evictable_leaf(node) or priority != self.policy.priority(node):
                continue
            freed.append(self._remove(node))
            if node.parent is not None and node.parent is not self.root:
                self._push_if_leaf(node.parent)
        return freed

    def _remove(self, node: RadixNode) -> int:
        assert node.parent is not None  # NOTE: the root is never evicted
        del node.parent.children[node.tokens]
        node.evicted = True
        self.num_cached_blocks -= 1
        self.num_evictable_blocks -= 1
        return node.block_id

    def _is_evictable_leaf(self, node: RadixNode) -> bool:
        return not node.evicted and node.ref_count == 0 and not node.children

    def _push_if_leaf(self, node: RadixNode) -> None:
        if self._is_evictable_leaf(node):
            entry = (self.policy.priority(node), next(self._tiebreak), node)
            heapq.heappush(self._heap, entry)

    def _rebuild_heap(self) -> None:
        self._heap = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            self._push_if_leaf(node)

    def reset(self) -> list[int]:
        """Drop every unreferenced block (for tests and cache flushes); returns freed ids."""
        return self.evict(self.num_evictable_blocks)

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0
