"""Chat-trace workload: simulated users chatting multi-turn with the bundled characters.

Seeded and deterministic: personas (about 800 tokens each, built from the bundled cards and
their lorebooks), user turns (human utterances of `chitchat-dataset`), reply caps, arrival
times and think times. Replies are not part of the trace: the replay client appends each
peer's real reply to its own history. Nothing here talks to a server.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

PERSONA_TARGET_TOKENS = 800
USER_NAME = "Traveller"


@dataclass(frozen=True)
class TraceConfig:
    num_users: int
    num_turns: int
    seed: int = 0
    min_reply_tokens: int = 64
    max_reply_tokens: int = 128
    mean_arrival_gap_s: float = 2.0  # Poisson arrivals of users' first turns
    mean_think_s: float = 3.0  # exponential pause between a reply and the user's next turn

    def __post_init__(self) -> None:
        if self.num_users < 1 or self.num_turns < 1:
            raise ValueError("a trace needs at least one user and one turn")
        if not 1 <= self.min_reply_tokens <= self.max_reply_tokens:
            raise ValueError("reply caps must satisfy 1 <= min_reply_tokens <= max_reply_tokens")


@dataclass(frozen=True)
class Turn:
    text: str
    max_tokens: int
    think_s: float  # pause after the previous reply (0 for the first turn)


@dataclass(frozen=True)
class UserSession:
    user_id: str
    persona_index: int
    start_s: float  # offset from the trace start of the first turn
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class ChatTrace:
    config: TraceConfig
    personas: tuple[str, ...]  # system prompts
    users: tuple[UserSession, ...]

    @property
    def num_requests(self) -> int:
        return sum(len(user.turns) for user in self.users)


def _fill_macros(text: str, name: str) -> str:
    return text.replace("{{char}}", name).replace("{{user}}", USER_NAME).strip()


def render_persona(character: Any, count_tokens: Any, target_tokens: int) -> str:
    """A system prompt: card fields, then lore entries until about `target_tokens`."""
    name = character.name
    head = [
        f"You are {name}. Stay in character and reply to {USER_NAME} in a few sentences.",
        f"## Description\n{_fill_macros(character.description, name)}",
        f"## Personality\n{_fill_macros(character.personality, name)}",
        f"## Scenario\n{_fill_macros(character.scenario, name)}",
    ]
    tail = f"## Example dialogue\n{_fill_macros(character.mes_example, name)}"
    lore: list[str] = []
    entries = character.character_book.entries if character.character_book else []
    for entry in entries:
        candidate = "\n\n".join([*head, "## Lore", *lore, entry.content.strip(), tail])
        if count_tokens(candidate) > target_tokens:
            break
        lore.append(entry.content.strip())
    sections = [*head, "## Lore", *lore, tail] if lore else [*head, tail]
    return "\n\n".join(sections)


def load_personas(count_tokens: Any, target_tokens: int = PERSONA_TARGET_TOKENS) -> list[str]:
    from talkloop.characters.bundled import load_bundled_characters

    return [render_persona(c, count_tokens, target_tokens) for c in load_bundled_characters()]


def load_user_conversations() -> list[list[str]]:
    """Per conversation, the first speaker's messages (a message = its utterances joined)."""
    raw = json.loads(files("chitchat_dataset").joinpath("dataset.json").read_text("utf-8"))
    conversations = []
    for key in sorted(raw):
        messages = raw[key]["messages"]
        human = [" ".join(u["text"] for u in message).strip() for message in messages[::2]]
        human = [text for text in human if text]
        if human:
            conversations.append(human)
    return conversations


def build_trace(
    config: TraceConfig, personas: list[str], conversations: list[list[str]]
) -> ChatTrace:
    rng = random.Random(config.seed)
    long_enough = [c for c in conversations if len(c) >= config.num_turns]
    if len(long_enough) < config.num_users:
        raise ValueError(f"only {len(long_enough)} conversations have {config.num_turns} turns")
    picked = rng.sample(long_enough, config.num_users)
    users = []
    start_s = 0.0
    for index, conversation in enumerate(picked):
        if index:
            start_s += rng.expovariate(1.0 / config.mean_arrival_gap_s)
        turns = tuple(
            Turn(
                text=conversation[t],
                max_tokens=rng.randint(config.min_reply_tokens, config.max_reply_tokens),
                think_s=rng.expovariate(1.0 / config.mean_think_s) if t else 0.0,
            )
            for t in range(config.num_turns)
        )
        users.append(UserSession(f"user-{index:03d}", index % len(personas), start_s, turns))
    return ChatTrace(config, tuple(personas), tuple(users))
