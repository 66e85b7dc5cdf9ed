"""Exact scheduler decisions and block accounting (no model needed)."""

from __future__ import annotations

from talkloop.engine.block_manager import BlockManager
from talkloop.engine.config import SchedulerConfig
from talkloop.engine.scheduler import Scheduler
from talkloop.engine.sequence import Sequence, SequenceStatus
from tests.engine.tiny import greedy


def _seq(seq_id: int, prompt_len: int) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, list(range(prompt_len)), greedy(max_tokens=8))


def _run(output: object) -> None:
    """Pretend the model ran: advance progress and sample token 7 where due."""
    for item in output.scheduled:  # type: ignore[attr-defined]
        samples = item.samples
        item.seq.num_computed_tokens += item.num_new_tokens
        if samples:
            item.seq.append_token(7)


def test_chunked_prefill_under_token_budget() -> None:
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=10, watermark_fraction=0), bm)
    a, b = _seq(0, 25), _seq(1, 3)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(s.seq.seq_id, s.num_new_tokens, s.samples) for s in out.scheduled] == [(0, 10, False)]
    assert a.block_ids == [0, 1, 2]
    _run(out)
    out = sched.schedule()
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [(0, 10)]
    _run(out)
    out = sched.schedule()  # a finishes its prompt (5 tokens), b joins with its 3
    assert [(s.seq.seq_id, s.num_new_tokens, s.samples) for s in out.scheduled] == [
        (0, 5, True),
        (1, 3, True),
    ]
    _run(out)
    out = sched.schedule()  # both decode one token
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [(0, 1), (1, 1)]
    assert a.block_ids == [0, 1, 2, 3, 4, 5, 6] and b.block_ids == [7]
    assert bm.num_free_blocks == 92


def test_max_num_seqs_limits_admission() -> None:
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, watermark_fraction=0), bm)
    for i in range(3):
        sched.add(_seq(i, 2))
    out = sched.schedule()
    assert [s.seq.seq_id for s in out.scheduled] == [0, 1]
    assert [s.seq_id for s in sched.waiting] == [2]


def test_preemption_picks_latest_arrival_and_frees_exactly() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = Scheduler(SchedulerConfig(watermark_fraction=0), bm)
    a, b = _seq(0, 4), _seq(1, 3)  # a: 2 blocks, b: 2 blocks -> pool full
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [s.seq.seq_id for s in out.scheduled] == [0, 1]
    assert bm.num_free_blocks == 0
    _run(out)
    # a has 5 tokens (needs a 3rd block); b (latest) is preempted, its 2 blocks freed.
    out = sched.schedule()
    assert out.preempted_seq_ids == (1,)
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [(0, 1)]
    assert b.status is SequenceStatus.WAITING and b.block_ids == [] and b.num_computed_tokens == 0
    assert b.output_token_ids == [7] and list(sched.waiting) == [b]
    assert len(a.block_ids) == 3 and bm.num_free_blocks == 1
    sched.finish(a)
    assert bm.num_free_blocks == 4
    out = sched.schedule()  # b recomputes prompt + its generated token
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [(1, 4)]


def test_finish_and_abort_release_every_block() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    sched = Scheduler(SchedulerConfig(watermark_fraction=0), bm)
    seqs = [_seq(i, 5) for i in range(3)]
    for s in seqs:
        sched.add(s)
    _run(sched.schedule())
    assert bm.num_free_blocks == 4
    sched.finish(seqs[1])  # running
    assert bm.num_free_blocks == 6
    waiting = _seq(9, 3)
    sched.add(waiting)
    sched.finish(waiting)  # still waiting: no blocks, just removed
    assert waiting not in sched.waiting and bm.num_free_blocks == 6
    for s in (seqs[0], seqs[2]):
        sched.finish(s)
    assert bm.num_free_blocks == 10 and not sched.has_work
