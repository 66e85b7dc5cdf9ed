"""`HashRing`: consistent hashing of string keys (session ids) onto named nodes (replicas).

Each node owns `num_vnodes` points on a 64-bit ring; a key belongs to the first point
clockwise from its hash. Adding or removing one of N nodes moves only about 1/N of the keys.
It knows nothing of health: callers walk `candidates(key)` and skip nodes that are down,
so a down node's keys fall to the next node on the ring and come back when it returns.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator

DEFAULT_NUM_VNODES = 160


def ring_hash(text: str) -> int:
    """A stable 64-bit hash (the same in every process, unlike `hash()`)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class HashRing:
    def __init__(self, nodes: Iterable[str] = (), num_vnodes: int = DEFAULT_NUM_VNODES) -> None:
        if num_vnodes < 1:
            raise ValueError(f"num_vnodes must be >= 1, got {num_vnodes}")
        self.num_vnodes = num_vnodes
        self._points: list[int] = []  # sorted ring positions
        self._owners: list[str] = []  # _owners[i] owns _points[i]
        self._nodes: set[str] = set()
        for node in nodes:
            self.add(node)

    @property
    def nodes(self) -> frozenset[str]:
        return frozenset(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def add(self, node: str) -> None:
        if node in self._nodes:
            raise ValueError(f"node {node!r} is already on the ring")
        self._nodes.add(node)
        for replica in range(self.num_vnodes):
            point = ring_hash(f"{node}#{replica}")
            index = bisect.bisect_left(self._points, point)
            self._points.insert(index, point)
            self._owners.insert(index, node)

    def remove(self, node: str) -> None:
        if node not in self._nodes:
            raise ValueError(f"node {node!r} is not on the ring; nodes: {sorted(self._nodes)}")
        self._nodes.remove(node)
        kept = [(p, o) for p, o in zip(self._points, self._owners, strict=True) if o != node]
        self._points = [p for p, _ in kept]
        self._owners = [o for _, o in kept]

    def node_for(self, key: str) -> str:
        """The node that owns `key`."""
        return next(self.candidates(key))

    def candidates(self, key: str) -> Iterator[str]:
        """Every node once, in ring order from `key`'s owner: the failover order for `key`."""
        if not self._points:
            raise LookupError("the hash ring has no nodes")
        start = bisect.bisect_right(self._points, ring_hash(key))
        seen: set[str] = set()
        num_points = len(self._points)
        for offset in range(num_points):
            owner = self._owners[(start + offset) % num_points]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self._nodes):
                    return
