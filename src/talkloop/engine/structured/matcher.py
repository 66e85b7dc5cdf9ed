"""`GrammarMatcher`: where one sequence stands in its grammar.

Gives the tokens allowed next (as a bitmask row), advances on the sampled token, rolls back
(speculative decoding), and says when the grammar is complete. One per sequence; built by
`GrammarCompiler.matcher()`. Does not touch logits (`bitmask.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import llguidance
import torch

from talkloop.engine.errors import EngineError
from talkloop.engine.structured.bitmask import bitmask_width, unpack_bitmask


class GrammarViolationError(EngineError):
    """A token was fed to a matcher that its grammar does not allow (masks were not applied)."""


class GrammarMatcher:
    """One sequence's grammar state over the tokenizer's `vocab_size` ids."""

    def __init__(
        self, matcher: llguidance.LLMatcher, vocab_size: int, eos_token_ids: tuple[int, ...]
    ) -> None:
        self.ll_matcher = matcher
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.num_tokens = 0  # tokens advanced so far (what `rollback` can undo)

    @property
    def is_finished(self) -> bool:
        """The grammar is complete: nothing but an EOS token may follow."""
        return bool(self.ll_matcher.is_stopped())

    @property
    def is_accepting(self) -> bool:
        """The output so far is a whole match (EOS is allowed, though more may be too)."""
        return bool(self.ll_matcher.is_accepting())

    def fill_bitmask(self, bitmask_row: torch.Tensor) -> None:
        """Write the next-token bitmask into `bitmask_row` ([W] int32, contiguous, on CPU).

        A finished grammar allows only the EOS tokens.
        """
        _check_row(bitmask_row, bitmask_width(self.vocab_size))
        num_bytes = bitmask_row.numel() * bitmask_row.element_size()
        self.ll_matcher.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), num_bytes)

    def allowed_mask(self) -> torch.Tensor:
        """[vocab_size] bool: the tokens allowed next."""
        row = torch.zeros(bitmask_width(self.vocab_size), dtype=torch.int32)
        self.fill_bitmask(row)
        return unpack_bitmask(row, self.vocab_size)

    def advance(self, token_id: int) -> None:
        """Consume the sampled token; raises `GrammarViolationError` if it is not allowed."""
        if not self.ll_matcher.consume_token(token_id):
            error = self.ll_matcher.get_error().strip().splitlines()
            raise GrammarViolationError(
                f"token {token_id} is not allowed after {self.num_tokens} constrained tokens: "
                f"{error[0] if error else 'the grammar has ended'}"
            )
        self.num_tokens += 1

    def count_valid(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of a draft the grammar allows (the state is unchanged)."""
        return int(self.ll_matcher.validate_tokens(list(token_ids)))

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` advances (rejected draft tokens, a truncated output)."""
        if not 0 <= num_tokens <= self.num_tokens:
            raise ValueError(
                f"cannot roll back {num_tokens} tokens; the matcher has advanced {self.num_tokens}"
            )
        if num_tokens and not self.ll_matcher.rollback(num_tokens):
            raise GrammarViolationError(f"rollback of {num_tokens} tokens failed")
        self.num_tokens -= num_tokens

    def copy(self) -> GrammarMatcher:
        """An independent matcher in the same state (a forked sequence)."""
        twin = GrammarMatcher(self.ll_matcher.deep_copy(), self.vocab_size, self.eos_token_ids)
        twin.num_tokens = self.num_tokens
        return twin


def _check_row(row: torch.Tensor, width: int) -> None:
    if row.dtype != torch.int32 or row.device.type != "cpu" or not row.is_contiguous():
        raise ValueError(
            f"bitmask row must be contiguous int32 on CPU, got {row.dtype} on {row.device}"
        )
    if row.shape != (width,):
        raise ValueError(f"bitmask row must have shape ({width},), got {tuple(row.shape)}")
