"""Which decoding sequences share leading KV blocks, so attention reads those blocks once.

Character chat decodes many conversations over one persona prefix: with the radix cache their
block tables start with the same physical blocks. Attending each sequence to its whole context
reads the shared blocks once per sequence; grouping them lets attention read the shared part
once per group (queries stacked) and each sequence's own suffix separately, the two partial
softmaxes merged by their log-sum-exp (cascade attention, as in FlashInfer and vLLM).

Grouping is greedy over the tree the tables form: members are split by the block at the depth
where they diverge, and a split is kept when its subgroups save more block reads than sharing
the common part alone would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Below this many shared blocks a group's extra kernels cost more than the reads it saves.
MIN_SHARED_BLOCKS = 4
# With the native decode kernel, which reads each row's blocks in place and visits rows that
# share blocks back to back (from cache), a group pays for its gather, matmuls and merge only
# when it is large. Measured here (16 rows over ~1k-token contexts sharing 768 tokens, int4,
# 2 cores): one group of 16 -> step 72 vs 86 ms without grouping; 2 groups of 8 -> 84 vs 84;
# 3 to 5 groups of 3-6 -> 88-104 vs 85; 8 groups of 2 -> 137 vs 90.
MIN_NATIVE_MEMBERS = 10


@dataclass(frozen=True)
class SharedGroup:
    members: tuple[int, ...]  # indices into the decode batch
    num_blocks: int  # leading blocks every member shares


def shared_prefix_groups(
    tables: Sequence[Sequence[int]],
    shareable: Sequence[int],
    min_blocks: int = MIN_SHARED_BLOCKS,
    min_members: int = 2,
) -> list[SharedGroup]:
    """Disjoint groups of >= `min_members` sequences sharing >= `min_blocks` leading blocks.

    `tables[i]` is sequence i's block table; `shareable[i]` caps how many of its leading blocks
    may be shared (those wholly before the block its newest token is written to).
    """

    def common_depth(members: list[int], depth: int) -> int:
        first = tables[members[0]]
        while all(depth < shareable[m] for m in members) and all(
            tables[m][depth] == first[depth] for m in members
        ):
            depth += 1
        return depth

    def saving(groups: list[SharedGroup]) -> int:
        return sum((len(g.members) - 1) * g.num_blocks for g in groups)

    def split(members: list[int], depth: int) -> list[SharedGroup]:
        """Groups among `members`, which all share their first `depth` blocks."""
        by_block: dict[int, list[int]] = {}
        for m in members:
            if depth < shareable[m]:
                by_block.setdefault(tables[m][depth], []).append(m)
        groups: list[SharedGroup] = []
        for sub in by_block.values():
            if len(sub) < max(2, min_members):  # nor can any group inside it be large enough
                continue
            shared = common_depth(sub, depth + 1)
            deeper = split(sub, shared)
            whole = SharedGroup(tuple(sub), shared)
            if shared >= min_blocks and saving([whole]) >= saving(deeper):
                groups.append(whole)
            else:
                groups.extend(deeper)
        return groups

    return split(list(range(len(tables))), 0)
