"""Prompt assembly settings: the context window, per-section token caps, default texts and
the shared-prefix policy. Plain frozen data validated on construction; no assembly here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from talkloop.characters.lorebook import ScanSettings

DEFAULT_SYSTEM_PROMPT = (
    "Write {{char}}'s next reply in a fictional chat between {{char}} and {{user}}. "
    "Stay in character."
)
DEFAULT_TRIM_MARKER = "[Earlier messages are not shown.]"


@dataclass(frozen=True)
class SectionBudgets:
    """Token caps per section (None: uncapped). Text sections are cut after a whole word,
    example blocks are dropped from the last, and the lore cap tightens the books' budget."""

    system_tokens: int | None = None
    character_tokens: int | None = None
    examples_tokens: int | None = None
    persona_tokens: int | None = None
    memory_tokens: int | None = None
    lore_tokens: int | None = None
    post_history_tokens: int | None = None

    def __post_init__(self) -> None:
        for budget in fields(self):
            value = getattr(self, budget.name)
            if value is not None and value < 0:
                raise ValueError(f"SectionBudgets.{budget.name} must be >= 0 or None, got {value}")


@dataclass(frozen=True)
class PromptSettings:
    """How prompts are built; one per deployment or per model."""

    context_tokens: int = 8192
    reply_reserve_tokens: int = 512
    message_overhead_tokens: int = 4
    """Tokens a chat template adds around each message (ChatML: about 4)."""
    budgets: SectionBudgets = field(default_factory=SectionBudgets)
    default_system_prompt: str = DEFAULT_SYSTEM_PROMPT
    default_post_history_instructions: str = ""
    shared_user_name: str | None = "User"
    """What `{{user}}` renders as in the stable prefix (the persona message then gives the
    real name); None renders the persona's name there too, making the prefix per user."""
    trim_marker: str = DEFAULT_TRIM_MARKER
    trim_step_turns: int = 1
    """Trim whole multiples of this many turns, so the cut (and the cache) moves less often."""
    lore: ScanSettings = field(default_factory=ScanSettings)

    def __post_init__(self) -> None:
        if self.reply_reserve_tokens < 0 or self.message_overhead_tokens < 0:
            raise ValueError(
                "reply_reserve_tokens and message_overhead_tokens must be >= 0, got "
                f"{self.reply_reserve_tokens} and {self.message_overhead_tokens}"
            )
        if self.context_tokens <= self.reply_reserve_tokens:
            raise ValueError(
                f"context_tokens ({self.context_tokens}) must exceed reply_reserve_tokens "
                f"({self.reply_reserve_tokens})"
            )
        if self.trim_step_turns < 1:
            raise ValueError(f"trim_step_turns must be at least 1, got {self.trim_step_turns}")
        if self.shared_user_name is not None and not self.shared_user_name.strip():
            raise ValueError("shared_user_name must be a non-empty name or None, got ''")

    @property
    def prompt_tokens(self) -> int:
        """Tokens the prompt may use: the context window minus the reply reserve."""
        return self.context_tokens - self.reply_reserve_tokens
