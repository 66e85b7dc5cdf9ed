"""Masks a batch of logits by its grammars: -inf on every token a row's grammar does not allow.

`apply_grammar_masks(logits, matchers)` is the sampler's one call: [N, V] logits and one matcher
(or None: unconstrained) per row. A bitmask row holds W = ceil(vocab / 32) int32 words; bit
`t % 32` of word `t // 32` allows token t. Does not advance matchers (the engine does that after
sampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import llguidance
import numpy as np
import torch

if TYPE_CHECKING:
    from talkloop.engine.structured.matcher import GrammarMatcher


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row."""
    return (vocab_size + 31) // 32


def _unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[..., W] int32 on CPU -> [..., vocab_size] bool, token t at bit t % 32 of word t // 32.

    NOTE: numpy's unpackbits over the words' bytes is ~30x faster than torch shifts. It needs
    little-endian words (x86, ARM): bit t % 32 of a word is then bit t % 8 of its byte
    (t % 32) // 8, so bit i of the flat byte string is token i.
    """
    as_bytes = bitmask.contiguous().numpy().view(np.uint8)  # [..., 4W]
    bits = np.unpackbits(as_bytes, axis=-1, bitorder="little")[..., :vocab_size]
    return torch.from_numpy(bits).view(torch.bool)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[..., W] int32 bitmask (CPU) -> [..., vocab_size] bool, True where the token is allowed."""
    return _unpack(bitmask, vocab_size)


def blocked_tokens(
    bitmask: torch.Tensor, vocab_size: int, num_columns: int, eos_token_ids: Sequence[int]
) -> torch.Tensor:
    """[K, W] bitmask -> [K, num_columns] bool over the logit columns, True where NOT allowed.

    Columns past the tokenizer's `vocab_size` (a padded embedding) are always blocked; a row
    that allows nothing (a matcher in an error state) is given its EOS tokens, so it ends.
    """
    blocked = _unpack(~bitmask, vocab_size)  # [K, vocab_size]
    if num_columns > vocab_size:
        padding = blocked.new_ones(blocked.shape[0], num_columns - vocab_size)
        blocked = torch.cat([blocked, padding], dim=1)
    blocked = blocked[:, :num_columns]
    nothing_allowed = blocked.all(dim=1, keepdim=True)  # [K, 1]
    eos = torch.tensor(eos_token_ids, dtype=torch.int64)
    blocked[:, eos] &= ~nothing_allowed
    return blocked


def fill_bitmasks(
    matchers: Sequence[GrammarMatcher], executor: llguidance.LLExecutor | None = None
) -> torch.Tensor:
    """[K, W] int32: each matcher's next-token bitmask, in parallel when given an executor."""
    width = bitmask_width(matchers[0].vocab_size)
    bitmask = torch.zeros(len(matchers), width, dtype=torch.int32)
    if executor is None or len(matchers) == 1:
        for row, matcher in enumerate(matchers):
            matcher.fill_bitmask(bitmask[row])
        return bitmask
    jobs = [(matcher.ll_matcher, row) for row, matcher in enumerate(matchers)]
    executor.unsafe_compute_mask_ptr(jobs, bitmask.data_ptr(), width * 4, len(matchers))
    return bitmask


def apply_grammar_masks(
    logits: torch.Tensor,
    matchers: Sequence[GrammarMatcher | None],
    executor: llguidance.LLExecutor | None = None,
) -> None:
    """Set logits [N, V] to -inf, in place, wherever row i's matcher disallows the token.

    Rows whose matcher is None are untouched; a finished grammar leaves only its EOS tokens.
    """
    rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return
    constrained = [m for m in matchers if m is not None]
    first = constrained[0]
    bitmask = fill_bitmasks(constrained, executor)
    blocked = blocked_tokens(bitmask, first.vocab_size, logits.shape[1], first.eos_token_ids)
    blocked = blocked.to(logits.device)
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(blocked, float("-inf"))
        return
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    logits[index] = logits[index].masked_fill(blocked, float("-inf"))
