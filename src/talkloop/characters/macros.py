"""Macro expansion for card text: `{{char}}`, `{{user}}`, `{{random:...}}`, `{{roll:...}}` and kin.

One pass, left to right; expanded values are never re-scanned, so a user named `{{char}}`
stays literal. Names are case-insensitive; unknown or malformed macros are left as written.
Randomness is a pure function of the context's seeds and the macro's position in the text.
Nothing here reads the wall clock directly: time comes from the context's injected clock.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

# `{{body}}` where body holds no nested braces (comments may span lines), or `<BOT>`/`<USER>`.
_MACRO = re.compile(r"\{\{((?:(?!\{\{|\}\}).)*)\}\}|<(bot|user|char)>", re.DOTALL | re.IGNORECASE)
_CALL = re.compile(r"\s*([A-Za-z_]\w*)(.*)", re.DOTALL)
_UNESCAPED_COMMA = re.compile(r"(?<!\\),")
_DICE = re.compile(r"(\d*)d(\d+)([+-]\d+)?", re.IGNORECASE)

MAX_DICE = 1_000
MAX_SIDES = 1_000_000
MAX_MODIFIER = 1_000_000


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class MacroContext:
    """Everything a macro may read. `seed` drives `{{random}}`/`{{roll}}` (vary it per turn or
    per swipe); `conversation_id` drives `{{pick}}`, which stays fixed for a conversation."""

    char: str = ""
    user: str = "User"
    original: str = ""
    conversation_id: str = ""
    seed: int = 0
    clock: Callable[[], datetime] = field(default=_utc_now, compare=False)


@dataclass(frozen=True)
class MacroCall:
    """One parsed `{{name...}}`: its lower-cased name, arguments, source text and offset."""

    name: str
    args: tuple[str, ...]
    has_args: bool
    body: str
    raw: str
    offset: int
    source: str = field(repr=False)


# A handler returns the replacement text, or None to leave the macro as written.
MacroHandler = Callable[[MacroCall, MacroContext], str | None]


def _split_args(rest: str) -> tuple[tuple[str, ...], bool]:
    if rest.startswith("::"):
        return tuple(rest[2:].split("::")), True
    if rest.startswith(":") or (rest[:1].isspace() and rest.strip()):
        items = _UNESCAPED_COMMA.split(rest[1:])
        return tuple(item.replace("\\,", ",").strip() for item in items), True
    return (), False


def parse_call(body: str, raw: str, offset: int, source: str) -> MacroCall | None:
    """Parse the inside of `{{...}}`; None when it is not a macro call at all."""
    match = _CALL.fullmatch(body)
    if match is None:
        return None
    name, rest = match.groups()
    args, has_args = _split_args(rest)
    if not has_args and rest.strip():
        return None
    return MacroCall(name.lower(), args, has_args, body, raw, offset, source)


def _seeded_rng(*parts: object) -> random.Random:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _source_digest(source: str) -> str:
    return hashlib.blake2b(source.encode(), digest_size=8).hexdigest()


def _value(read: Callable[[MacroContext], str]) -> MacroHandler:
    """A macro without arguments that reads one value from the context."""

    def handler(call: MacroCall, ctx: MacroContext) -> str | None:
        return None if call.has_args else read(ctx)

    return handler


def _random(call: MacroCall, ctx: MacroContext) -> str | None:
    if not call.has_args:
        return None
    rng = _seeded_rng("random", ctx.seed, call.offset, call.body)
    return rng.choice(call.args)


def _pick(call: MacroCall, ctx: MacroContext) -> str | None:
    # Stable for a conversation: the seed ignores ctx.seed, so every turn picks the same.
    if not call.has_args:
        return None
    source = _source_digest(call.source)
    rng = _seeded_rng("pick", ctx.conversation_id, source, call.offset, call.body)
    return rng.choice(call.args)


@dataclass(frozen=True)
class DiceRoll:
    """`num_dice` dice of `num_sides` sides plus `modifier`: `2d6+1`, `d20`, `6` (= 1d6)."""

    num_dice: int
    num_sides: int
    modifier: int = 0

    @classmethod
    def parse(cls, text: str) -> DiceRoll | None:
        compact = "".join(text.split())
        if compact.isdigit():
            compact = f"1d{compact}"
        match = _DICE.fullmatch(compact)
        if match is None:
            return None
        count, sides, modifier = match.groups()
        roll = cls(int(count or 1), int(sides), int(modifier or 0))
        return roll if roll.is_reasonable() else None

    def is_reasonable(self) -> bool:
        return (
            1 <= self.num_dice <= MAX_DICE
            and 1 <= self.num_sides <= MAX_SIDES
            and abs(self.modifier) <= MAX_MODIFIER
        )

    def roll(self, rng: random.Random) -> int:
        return sum(rng.randint(1, self.num_sides) for _ in range(self.num_dice)) + self.modifier


def _roll(call: MacroCall, ctx: MacroContext) -> str | None:
    if len(call.args) != 1:
        return None
    dice = DiceRoll.parse(call.args[0])
    if dice is None:
        return None
    return str(dice.roll(_seeded_rng("roll", ctx.seed, call.offset, call.body)))


def format_time(moment: datetime) -> str:
    """`3:07 PM`, the way SillyTavern prints `{{time}}`."""
    hour_12 = moment.hour % 12 or 12
    return f"{hour_12}:{moment.minute:02d} {'AM' if moment.hour < 12 else 'PM'}"


def format_date(moment: datetime) -> str:
    """`January 5, 2025`, the way SillyTavern prints `{{date}}`."""
    return f"{moment.strftime('%B')} {moment.day}, {moment.year}"


DEFAULT_HANDLERS: Mapping[str, MacroHandler] = {
    "char": _value(lambda ctx: ctx.char),
    "user": _value(lambda ctx: ctx.user),
    "original": _value(lambda ctx: ctx.original),
    "random": _random,
    "pick": _pick,
    "roll": _roll,
    "time": _value(lambda ctx: format_time(ctx.clock())),
    "date": _value(lambda ctx: format_date(ctx.clock())),
    "weekday": _value(lambda ctx: ctx.clock().strftime("%A")),
    "isotime": _value(lambda ctx: ctx.clock().strftime("%H:%M")),
    "isodate": _value(lambda ctx: ctx.clock().date().isoformat()),
    "newline": _value(lambda ctx: "\n"),
    "noop": _value(lambda ctx: ""),
}

_ANGLE_FORMS: Mapping[str, Callable[[MacroContext], str]] = {
    "bot": lambda ctx: ctx.char,
    "char": lambda ctx: ctx.char,
    "user": lambda ctx: ctx.user,
}


class MacroEngine:
    """Expands macros through a registry of handlers, one per macro name."""

    def __init__(self, handlers: Mapping[str, MacroHandler] | None = None) -> None:
        source = DEFAULT_HANDLERS if handlers is None else handlers
        self._handlers: dict[str, MacroHandler] = {k.lower(): v for k, v in source.items()}

    def with_handler(self, name: str, handler: MacroHandler) -> MacroEngine:
        """A new engine with one more (or one replaced) macro."""
        return MacroEngine({**self._handlers, name: handler})

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._handlers)

    def render(self, text: str, ctx: MacroContext) -> str:
        if "{{" not in text and "<" not in text:
            return text
        return _MACRO.sub(lambda match: self._expand(match, text, ctx), text)

    def _expand(self, match: re.Match[str], source: str, ctx: MacroContext) -> str:
        body, angle = match.group(1), match.group(2)
        if angle is not None:
            return _ANGLE_FORMS[angle.lower()](ctx)
        if body.lstrip().startswith("//"):
            return ""
        call = parse_call(body, match.group(0), match.start(), source)
        handler = None if call is None else self._handlers.get(call.name)
        if call is None or handler is None:
            return match.group(0)
        result = handler(call, ctx)
        return match.group(0) if result is None else result


DEFAULT_ENGINE = MacroEngine()


def render_macros(text: str, ctx: MacroContext) -> str:
    """Expand every known macro in `text` with the default handlers."""
    return DEFAULT_ENGINE.render(text, ctx)
