"""Continuous batching scheduler: FCFS, chunked prefill under a token budget, preemption.

Each step spends a token budget: running sequences first (decodes take one token, unfinished
prefills take a chunk), then waiting sequences join while budget, blocks and `max_num_seqs`
allow. When blocks run out the latest-arrived running sequence is preempted by recompute.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass

from talkloop.engine.block_manager import BlockManager
from talkloop.engine.config import SchedulerConfig
from talkloop.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # includes draft tokens when speculating
    num_draft_tokens: int = 0

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so a token is sampled."""
        end = self.seq.num_computed_tokens + self.num_new_tokens - self.num_draft_tokens
        return end == self.seq.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledSeq, ...]
    preempted_seq_ids: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._watermark_blocks = int(block_manager.num_blocks * config.watermark_fraction)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled, preempted = self._schedule_running(budget)
        budget -= sum(s.num_new_tokens for s in scheduled)
        if not preempted:
            scheduled += self._schedule_waiting(budget)
        return SchedulerOutput(tuple(scheduled), tuple(s.seq_id for s in preempted))

    def _schedule_running(self, budget: int) -> tuple[list[ScheduledSeq], list[Sequence]]:
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            lookahead = seq.num_lookahead_tokens if seq.num_uncomputed_tokens == 1 else 0
            num_new = min(seq.num_uncomputed_tokens + lookahead, budget)
            target = seq.num_computed_tokens + num_new
            while not self.block_manager.can_allocate(seq, target):
                victim = self.running.pop()  # NOTE: the victim always sits at index >= i
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    return scheduled, preempted
            self.block_manager.allocate(seq, target)
            scheduled.append(
                ScheduledSeq(seq, num_new, max(0, num_new - seq.num_uncomputed_tokens))
            )
            budget -= num_new
            i += 1
        return scheduled, preempted

    def _schedule_waiting(self, budget: int) -> list[ScheduledSeq]:
        scheduled: list[ScheduledSeq] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self._pick_waiting()
            self.block_manager.match_prefix(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            target = seq.num_computed_tokens + num_new
            needed = self.block_manager.blocks_needed(seq, target)
            if needed + self._watermark_blocks > self.block_manager.num_available_blocks:
                self.block_manager.free(seq)  # undo the match; try again next step
                seq.num_computed_tokens = 0
                break
            self.waiting.remove(seq)
            for other in self.waiting:
                other.num_skips += other.arrival_time < seq.arrival_time
            self.block_manager.allocate(seq, target)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:  # not again after a preemption
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return scheduled

    def _pick_waiting(self) -> Sequence:
        """Cache-aware order: within a small window of the queue, prefer the longest cached
        prefix; a request passed over `max_skips` times goes first (no starvation)."""
        head = self.waiting[0]
        if head.num_skips >= self.config.max_skips or self.block_manager.cache is None:
            return head
        window = list(itertools.islice(self.waiting, self.config.cache_aware_window))
        return max(window, key=self.block_manager.peek_cached_tokens)  # ties: earliest

    def _preempt(self, seq: Sequence) -> None:
        """Preempt by recompute: drop the cache, keep the tokens, go back to the queue front."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
