"""The chat history as the prompt sees it: turns, trimming to a token budget, and at-depth
insertion of lore.

A turn starts at each user message (anything before the first one, such as the greeting, is
turn 0). Trimming drops whole turns from the oldest and leaves a marker message where a
summary will go; the latest turn is never dropped. Rendering and the rest of the prompt
live in `assembler.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from talkloop.characters.lorebook import ROLES, Role
from talkloop.characters.tokens import TokenCounter


@dataclass(frozen=True)
class HistoryMessage:
    """One message of the active path; `name` is the speaker (for group rooms)."""

    role: Role
    content: str
    name: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"history role must be one of {ROLES}, got {self.role!r}")


@dataclass(frozen=True)
class DepthInsert:
    """Lore to insert `depth` messages before the end of the history, as `role`."""

    depth: int
    role: Role
    content: str


@dataclass(frozen=True)
class TrimmedHistory:
    messages: tuple[HistoryMessage, ...]
    num_trimmed_turns: int


def count_assistant_messages(history: Sequence[HistoryMessage]) -> int:
    """The turn number V3 timing decorators count: character messages so far."""
    return sum(1 for message in history if message.role == "assistant")


def split_turns(history: Sequence[HistoryMessage]) -> list[list[HistoryMessage]]:
    turns: list[list[HistoryMessage]] = []
    for message in history:
        if message.role == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    return turns


@dataclass(frozen=True)
class HistoryBudget:
    """What trimming needs to know: tokens left for the history, the cost model, the marker."""

    max_tokens: int
    counter: TokenCounter
    message_overhead_tokens: int
    marker: str
    trim_step_turns: int = 1

    def cost(self, text: str) -> int:
        return self.counter.count(text) + self.message_overhead_tokens


def trim_history(history: Sequence[HistoryMessage], budget: HistoryBudget) -> TrimmedHistory | None:
    """Drop the fewest oldest turns (rounded up to `trim_step_turns`) so that the rest plus
    the marker fit; None when even the latest turn alone does not fit."""
    turns = split_turns(history)
    costs = [sum(budget.cost(message.content) for message in turn) for turn in turns]
    if sum(costs) <= budget.max_tokens:
        return TrimmedHistory(tuple(history), 0)
    room = budget.max_tokens - budget.cost(budget.marker)
    # kept_costs[k] = tokens of turns[k:]
    kept_costs = list(accumulate(reversed(costs)))[::-1]
    fitting = [k for k in range(1, len(turns)) if kept_costs[k] <= room]
    if not fitting:
        return None
    step = budget.trim_step_turns
    num_trimmed = min(math.ceil(fitting[0] / step) * step, len(turns) - 1)
    kept = tuple(message for turn in turns[num_trimmed:] for message in turn)
    return TrimmedHistory(kept, num_trimmed)


def insert_at_depth(
    messages: Sequence[HistoryMessage], inserts: Sequence[DepthInsert]
) -> list[tuple[Role, str, bool]]:
    """History with lore inserted: `(role, content, is_lore)` in prompt order.

    Depth N goes before the N most recent messages (0: after the last; deeper than the
    history: before the first). Inserts sharing a depth and role become one message, their
    contents joined by newlines in the given order; at one spot deeper ones come first,
    then system, user, assistant.
    """
    grouped: dict[tuple[int, Role], list[str]] = {}
    for insert in inserts:
        if insert.content:
            grouped.setdefault((insert.depth, insert.role), []).append(insert.content)
    at_index: dict[int, list[tuple[int, int, Role, str]]] = {}
    for (depth, role), contents in grouped.items():
        index = max(0, len(messages) - depth)
        at_index.setdefault(index, []).append(
            (-depth, ROLES.index(role), role, "\n".join(contents))
        )
    out: list[tuple[Role, str, bool]] = []
    for index in range(len(messages) + 1):
        out += [(role, text, True) for _, _, role, text in sorted(at_index.get(index, []))]
        if index < len(messages):
            out.append((messages[index].role, messages[index].content, False))
    return out
