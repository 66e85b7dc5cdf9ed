"""Prompt assembly: the chat messages for one turn of a character chat.

Message order, most stable first, so an inference engine can reuse cached prefixes:

  1. system      the card's system prompt (`{{original}}` = the default one)      } stable prefix:
  2. character   stable lore, description, personality, scenario, stable lore    } the same for
  3. examples    `mes_example` `<START>` blocks (+ example-position stable lore)  } every user+turn
  4. persona     who the user is                         per user, fixed within a conversation
  5. history     oldest turns trimmed to a marker (a summary's slot later), with
                 at-depth lore inserted                            grows by one turn per turn
  6. memory      the memory slot (empty until memory retrieval fills it)             per turn
  7. lore        entries triggered this turn, plus world-book and turn-gated constants
  8. post-history instructions                                          last, strongest pull

Why: 1-3 depend only on the character, so every conversation with it shares them; in them
`{{user}}` renders as `PromptSettings.shared_user_name` and only character-book constants
without turn gates appear (world books are chosen per user). The persona varies per user but
not per turn, so it comes before the history. Things that change each turn (memory, triggered
lore) come after the history, so turn N+1 still reuses turn N's cached history; putting them
before it would invalidate the whole history every turn. Token counts use the
`tokens.TokenCounter` protocol; no chat template is applied here.
"""

from talkloop.characters.prompt.assembler import (
    SECTIONS,
    AssembledPrompt,
    ChatMessage,
    PromptAssembler,
    PromptBudgetError,
    PromptRequest,
    SectionTokens,
    parse_examples,
    truncate_to_tokens,
)
from talkloop.characters.prompt.history import (
    DepthInsert,
    HistoryMessage,
    insert_at_depth,
    split_turns,
)
from talkloop.characters.prompt.settings import (
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_TRIM_MARKER,
    PromptSettings,
    SectionBudgets,
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_TRIM_MARKER",
    "SECTIONS",
    "AssembledPrompt",
    "ChatMessage",
    "DepthInsert",
    "HistoryMessage",
    "PromptAssembler",
    "PromptBudgetError",
    "PromptRequest",
    "PromptSettings",
    "SectionBudgets",
    "SectionTokens",
    "insert_at_depth",
    "parse_examples",
    "split_turns",
    "truncate_to_tokens",
]
