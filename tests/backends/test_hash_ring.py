"""HashRing: exact assignment for a fixed ring, minimal movement on add/remove, failover order."""

from __future__ import annotations

from collections import Counter

import pytest

from talkloop.backends.hash_ring import HashRing, ring_hash

REPLICAS = ["http://a:8000/v1", "http://b:8000/v1", "http://c:8000/v1"]
KEYS = [f"key-{i}" for i in range(10_000)]


def _assignment(ring: HashRing) -> dict[str, str]:
    return {key: ring.node_for(key) for key in KEYS}


def test_assignment_for_a_fixed_ring_is_exact_and_stable_across_processes() -> None:
    ring = HashRing(REPLICAS)
    owners = [ring.node_for(f"conv-{i}")[7] for i in range(12)]
    assert owners == ["b", "a", "c", "b", "c", "b", "b", "a", "b", "c", "b", "c"]
    assert ring_hash("conv-0") == ring_hash("conv-0")  # blake2b, not the salted hash()


def test_nodes_share_keys_evenly() -> None:
    counts = Counter(_assignment(HashRing(["a", "b", "c", "d"])).values())
    assert counts == {"a": 2558, "c": 2507, "b": 2486, "d": 2449}


def test_adding_a_node_moves_only_about_one_nth_of_the_keys_and_only_to_it() -> None:
    ring = HashRing(["a", "b", "c", "d"])
    before = _assignment(ring)
    ring.add("e")
    after = _assignment(ring)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert {after[key] for key in moved} == {"e"}
    assert len(moved) == 1992  # ~1/5 of 10,000


def test_removing_a_node_moves_only_its_keys() -> None:
    ring = HashRing(["a", "b", "c", "d"])
    before = _assignment(ring)
    ring.remove("c")
    after = _assignment(ring)
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == "c"}
    assert "c" not in after.values()
    ring.add("c")
    assert _assignment(ring) == before  # it comes back to exactly the same keys


def test_candidates_list_every_node_once_owner_first() -> None:
    ring = HashRing(REPLICAS)
    for key in KEYS[:200]:
        order = list(ring.candidates(key))
        assert sorted(order) == sorted(REPLICAS)
        assert order[0] == ring.node_for(key)


def test_a_down_owners_keys_fall_to_the_node_that_removing_it_would_pick() -> None:
    ring = HashRing(REPLICAS)
    without_b = HashRing([r for r in REPLICAS if r != REPLICAS[1]])
    for key in KEYS[:500]:
        order = list(ring.candidates(key))
        fallback = order[1] if order[0] == REPLICAS[1] else order[0]
        assert fallback == without_b.node_for(key)


def test_bad_use_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="num_vnodes must be >= 1"):
        HashRing(num_vnodes=0)
    ring = HashRing(["a"])
    with pytest.raises(ValueError, match="'a' is already on the ring"):
        ring.add("a")
    with pytest.raises(ValueError, match="'z' is not on the ring"):
        ring.remove("z")
    ring.remove("a")
    with pytest.raises(LookupError, match="no nodes"):
        ring.node_for("k")
