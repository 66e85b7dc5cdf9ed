"""`PromptAssembler`: renders a character, lore, persona, memory and history into chat
messages in the cache-friendly order the package docstring documents, within token budgets.

Deterministic: the same request (and clock) gives the same messages. Applying a chat
template and tokenizing are the engine's job.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from talkloop.characters.errors import CharacterError
from talkloop.characters.lorebook import ActivatedLore, LorePosition, Role, ScannerCache
from talkloop.characters.macros import DEFAULT_ENGINE, MacroContext, MacroEngine
from talkloop.characters.model import Character, Lorebook
from talkloop.characters.persona import Persona
from talkloop.characters.prompt.history import (
    DepthInsert,
    HistoryBudget,
    HistoryMessage,
    count_assistant_messages,
    insert_at_depth,
    split_turns,
    trim_history,
)
from talkloop.characters.prompt.settings import PromptSettings
from talkloop.characters.tokens import TokenCounter, resolve_counter

_START = re.compile(r"<START>", re.IGNORECASE)
SECTIONS = (
    "system",
    "character",
    "examples",
    "persona",
    "history",
    "memory",
    "lore",
    "post_history",
)


class PromptBudgetError(CharacterError, ValueError):
    """The prompt cannot fit the context window even with all older history trimmed."""


@dataclass(frozen=True)
class ChatMessage:
    """One message for a chat template."""

    role: Role
    content: str


@dataclass(frozen=True)
class PromptRequest:
    """What varies per turn. `history` is the active path, oldest first; `turn` (character
    messages so far, for lore timing) defaults to the assistant messages in `history`."""

    character: Character
    history: Sequence[HistoryMessage] = ()
    persona: Persona = field(default_factory=Persona)
    world_books: Sequence[Lorebook] = ()
    conversation_id: str = ""
    seed: int = 0
    turn: int | None = None
    memory: str = ""


@dataclass(frozen=True)
class SectionTokens:
    """Content tokens per section, plus the template overhead of every message. Stable lore
    counts in `character`/`examples`; triggered and at-depth lore in `lore`; the trim
    marker in `history`."""

    system: int = 0
    character: int = 0
    examples: int = 0
    persona: int = 0
    history: int = 0
    memory: int = 0
    lore: int = 0
    post_history: int = 0
    overhead: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclass(frozen=True)
class AssembledPrompt:
    """The messages for a chat template plus what went into them."""

    messages: tuple[ChatMessage, ...]
    stable_prefix_messages: int
    """`messages[:stable_prefix_messages]` are identical for every user and turn."""
    section_tokens: SectionTokens
    lore_uids: tuple[str, ...]
    num_trimmed_turns: int
    summary_index: int | None
    """Index in `messages` of the trim marker (where a summary goes); None when untrimmed."""

    @property
    def num_tokens(self) -> int:
        return self.section_tokens.total

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": message.role, "content": message.content} for message in self.messages]


@dataclass(frozen=True)
class _Tagged:
    section: str
    message: ChatMessage
    num_tokens: int


@dataclass
class _Sections:
    """Messages collected in prompt order, each tagged with its section and counted once."""

    counter: TokenCounter
    overhead: int
    tagged: list[_Tagged] = field(default_factory=list)

    def add(self, section: str, content: str, role: Role = "system") -> None:
        if content:
            num_tokens = self.counter.count(content)
            self.tagged.append(_Tagged(section, ChatMessage(role, content), num_tokens))

    def num_tokens(self) -> int:
        return sum(tagged.num_tokens + self.overhead for tagged in self.tagged)

    def token_counts(self) -> SectionTokens:
        counts = dict.fromkeys(SECTIONS, 0)
        for tagged in self.tagged:
            counts[tagged.section] += tagged.num_tokens
        return SectionTokens(**counts, overhead=len(self.tagged) * self.overhead)


def truncate_to_tokens(text: str, max_tokens: int | None, counter: TokenCounter) -> str:
    """The longest head of `text` within `max_tokens`, cut after a whole word."""
    if max_tokens is None or counter.count(text) <= max_tokens:
        return text
    fits, too_long = 0, len(text)  # invariant: text[:fits] fits, text[:too_long] does not
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        fits, too_long = (
            (middle, too_long) if counter.count(text[:middle]) <= max_tokens else (fits, middle)
        )
    head = text[:fits]
    if not text[fits].isspace():
        head = head[: max(head.rfind(" "), 0)]
    return head.rstrip()


def parse_examples(mes_example: str) -> list[str]:
    """`mes_example` split into its `<START>` blocks, blank blocks dropped."""
    return [block.strip() for block in _START.split(mes_example) if block.strip()]


class PromptAssembler:
    """Builds `AssembledPrompt`s; keeps compiled lorebooks cached between turns.

    NOTE: the counter is called on every section each turn; wrap a real tokenizer in
    `tokens.CachingTokenCounter` so the unchanged prefix is not re-tokenized. `{{time}}` and
    `{{date}}` read `clock` (default: UTC now); in the stable prefix they break sharing.
    """

    def __init__(
        self,
        settings: PromptSettings | None = None,
        counter: TokenCounter | None = None,
        macros: MacroEngine = DEFAULT_ENGINE,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.settings = settings or PromptSettings()
        self.counter = resolve_counter(counter)
        self.macros = macros
        self.clock = clock
        self.scanners = ScannerCache()

    def assemble(self, request: PromptRequest) -> AssembledPrompt:
        lore = self._scan_lore(request)
        stable_ctx, user_ctx = self._contexts(request)
        head = self._stable_prefix(request.character, lore, stable_ctx)
        num_stable = len(head.tagged)
        head.add("persona", self._persona(request.persona, user_ctx))
        tail = self._tail(request, lore, user_ctx)
        fixed_tokens = head.num_tokens() + tail.num_tokens()
        history, num_trimmed = self._history(request.history, lore, user_ctx, fixed_tokens)
        summary_index = len(head.tagged) if num_trimmed else None
        head.tagged += history.tagged + tail.tagged
        return AssembledPrompt(
            messages=tuple(tagged.message for tagged in head.tagged),
            stable_prefix_messages=num_stable,
            section_tokens=head.token_counts(),
            lore_uids=lore.uids,
            num_trimmed_turns=num_trimmed,
            summary_index=summary_index,
        )

    def _sections(self) -> _Sections:
        return _Sections(self.counter, self.settings.message_overhead_tokens)

    def _scan_lore(self, request: PromptRequest) -> ActivatedLore:
        book = request.character.character_book
        scanner = self.scanners.get(book, request.world_books, self.settings.lore)
        turn = request.turn
        if turn is None:
            turn = count_assistant_messages(request.history)
        texts = [message.content for message in request.history]
        cap = self.settings.budgets.lore_tokens
        return scanner.scan(texts, turn=turn, counter=self.counter, token_budget=cap)

    def _contexts(self, request: PromptRequest) -> tuple[MacroContext, MacroContext]:
        """Macro contexts for the stable prefix (no user, turn or conversation in it) and
        for everything after it."""
        character, persona = request.character, request.persona
        char = character.nickname or character.name
        shared_user = self.settings.shared_user_name or persona.name
        stable = MacroContext(char=char, user=shared_user)
        user = MacroContext(
            char=char, user=persona.name, conversation_id=request.conversation_id, seed=request.seed
        )
        if self.clock is not None:
            stable = dataclasses.replace(stable, clock=self.clock)
            user = dataclasses.replace(user, clock=self.clock)
        return stable, user

    def _render(self, text: str, ctx: MacroContext, original: str = "") -> str:
        """Expand macros; `{{original}}` becomes `original`, itself expanded first."""
        if original:
            ctx = dataclasses.replace(ctx, original=self.macros.render(original, ctx).strip())
        return self.macros.render(text, ctx).strip()

    def _capped(self, text: str, max_tokens: int | None) -> str:
        return truncate_to_tokens(text, max_tokens, self.counter)

    def _stable_prefix(
        self, character: Character, lore: ActivatedLore, ctx: MacroContext
    ) -> _Sections:
        budgets = self.settings.budgets
        head = self._sections()
        system_prompt = character.system_prompt or "{{original}}"
        system = self._render(system_prompt, ctx, self.settings.default_system_prompt)
        head.add("system", self._capped(system, budgets.system_tokens))
        block = self._character_block(character, lore, ctx)
        head.add("character", self._capped(block, budgets.character_tokens))
        head.add("examples", self._examples(character, lore, ctx))
        return head

    def _stable_lore(
        self, lore: ActivatedLore, position: LorePosition, ctx: MacroContext
    ) -> list[str]:
        return [self._render(entry.content, ctx) for entry in lore.at(position) if entry.stable]

    def _character_block(self, character: Character, lore: ActivatedLore, ctx: MacroContext) -> str:
        personality = self._render(character.personality, ctx)
        scenario = self._render(character.scenario, ctx)
        pieces = [
            *self._stable_lore(lore, LorePosition.BEFORE_CHAR, ctx),
            self._render(character.description, ctx),
            f"{ctx.char}'s personality: {personality}" if personality else "",
            f"Scenario: {scenario}" if scenario else "",
            *self._stable_lore(lore, LorePosition.AFTER_CHAR, ctx),
        ]
        return "\n\n".join(piece for piece in pieces if piece)

    def _examples(self, character: Character, lore: ActivatedLore, ctx: MacroContext) -> str:
        blocks = [
            "Example dialogue:\n" + self._render(block, ctx)
            for block in parse_examples(character.mes_example)
        ]
        cap = self.settings.budgets.examples_tokens
        while blocks and cap is not None and self.counter.count("\n\n".join(blocks)) > cap:
            blocks.pop()  # the last block goes first: the first ones set the voice
        pieces = [
            *self._stable_lore(lore, LorePosition.BEFORE_EXAMPLES, ctx),
            *blocks,
            *self._stable_lore(lore, LorePosition.AFTER_EXAMPLES, ctx),
        ]
        return "\n\n".join(piece for piece in pieces if piece)

    def _persona(self, persona: Persona, ctx: MacroContext) -> str:
        shared = self.settings.shared_user_name
        lines = []
        if shared is not None and shared != persona.name:
            lines.append(f"{shared}'s name is {persona.name}.")
        description = self._render(persona.description, ctx)
        if description:
            lines.append(f"{persona.name}'s persona: {description}")
        return self._capped("\n".join(lines), self.settings.budgets.persona_tokens)

    def _tail(self, request: PromptRequest, lore: ActivatedLore, ctx: MacroContext) -> _Sections:
        settings = self.settings
        tail = self._sections()
        tail.add("memory", self._capped(request.memory.strip(), settings.budgets.memory_tokens))
        tail.add("lore", self._triggered_lore(lore, ctx))
        instructions = request.character.post_history_instructions or "{{original}}"
        post = self._render(instructions, ctx, settings.default_post_history_instructions)
        tail.add("post_history", self._capped(post, settings.budgets.post_history_tokens))
        return tail

    def _triggered_lore(self, lore: ActivatedLore, ctx: MacroContext) -> str:
        """Entries not in the stable prefix or at a depth: before-char ones first, then
        after-char, then the example positions, each in insertion order."""
        late = [
            entry
            for position in LorePosition
            if position is not LorePosition.AT_DEPTH
            for entry in lore.at(position)
            if not entry.stable
        ]
        rendered = (self._render(entry.content, ctx) for entry in late)
        return "\n".join(text for text in rendered if text)

    def _history(
        self,
        history: Sequence[HistoryMessage],
        lore: ActivatedLore,
        ctx: MacroContext,
        fixed_tokens: int,
    ) -> tuple[_Sections, int]:
        settings = self.settings
        out = self._sections()
        inserts = [
            DepthInsert(e.depth, e.role, self._render(e.content, ctx)) for e in lore.at_depth
        ]
        lore_tokens = sum(
            self.counter.count(i.content) + out.overhead for i in inserts if i.content
        )
        budget = HistoryBudget(
            max_tokens=settings.prompt_tokens - fixed_tokens - lore_tokens,
            counter=self.counter,
            message_overhead_tokens=out.overhead,
            marker=settings.trim_marker,
            trim_step_turns=settings.trim_step_turns,
        )
        trimmed = trim_history(history, budget)
        if trimmed is None:
            raise self._too_long(history, budget, fixed_tokens + lore_tokens)
        if trimmed.num_trimmed_turns:
            out.add("history", settings.trim_marker)
        for role, content, is_lore in insert_at_depth(trimmed.messages, inserts):
            out.add("lore" if is_lore else "history", content, role)
        return out, trimmed.num_trimmed_turns

    def _too_long(
        self, history: Sequence[HistoryMessage], budget: HistoryBudget, around_tokens: int
    ) -> PromptBudgetError:
        turns = split_turns(history)
        latest = sum(budget.cost(m.content) for m in turns[-1]) if turns else 0
        return PromptBudgetError(
            f"the prompt does not fit context_tokens - reply_reserve_tokens = "
            f"{self.settings.prompt_tokens}: the sections around the history take "
            f"{around_tokens} tokens, leaving {max(budget.max_tokens, 0)}, and the latest turn "
            f"alone needs {latest}; raise context_tokens or cap sections in "
            "PromptSettings.budgets"
        )
