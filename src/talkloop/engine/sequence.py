"""A sequence: one stream of tokens being generated, with its cache blocks and progress.

A request with `n > 1` owns n sequences. Progress is `num_computed_tokens` over
`token_ids` (prompt + output): a prefill is a step that computes several of them, a decode one.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from talkloop.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # choice index within its request (0..n-1)
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # monotonic; queue time ends here
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    cache_nodes: list[Any] = field(default_factory=list)  # prefix-cache path (shared blocks)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    num_skips: int = 0  # times a later arrival was admitted first (cache-aware scheduling)
    num_lookahead_tokens: int = 0  # draft slots to reserve this step (speculative decoding)
    draft_token_ids: list[int] = field(default_factory=list)  # this step's drafts, unverified
    spec_tracker: Any = None  # speculative.AcceptanceTracker when speculation is on
    draft_num_computed: int = 0  # positions whose draft-model KV is valid
    grammar: Any = None  # structured.matcher.GrammarMatcher when the output is constrained

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def finish(self, reason: FinishReason) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
