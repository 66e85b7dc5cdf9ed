"""V3 lorebook decorators: the `@@name value` lines at the start of an entry's content.

Parses them into a frozen `Decorators` and returns the content without them. Unknown names
and invalid values are ignored, `@@@` fallbacks apply only when the decorator they follow was
ignored, and the first occurrence of a name wins (all per the V3 spec). Acting on decorators
is the activation engine's job, not this module's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Decorators:
    """The decorators an entry carries; None/False/() where absent."""

    depth: int | None = None
    position: str | None = None
    role: Role | None = None
    activate_only_after: int | None = None
    activate_only_every: int | None = None
    dont_activate: bool = False
    activate: bool = False
    scan_depth: int | None = None
    additional_keys: tuple[str, ...] = ()
    exclude_keys: tuple[str, ...] = ()
    ignored: tuple[str, ...] = field(default=())
    """Names seen but not applied (unknown, invalid value, or a repeat)."""

    @property
    def depends_on_turn(self) -> bool:
        """True when activation changes with the turn number."""
        return self.activate_only_after is not None or self.activate_only_every is not None


# A value parser returns the field value, or None when the value is invalid.
ValueParser = Callable[[str], Any]


def _non_negative_int(value: str) -> int | None:
    try:
        number = int(value.strip())
    except ValueError:
        return None
    return number if number >= 0 else None


def _positive_int(value: str) -> int | None:
    number = _non_negative_int(value)
    return number if number else None


def _depth(value: str) -> int | None:
    # V3: a depth below 1 means "after the most recent message", i.e. depth 0.
    try:
        return max(0, int(value.strip()))
    except ValueError:
        return None


def _role(value: str) -> Role | None:
    name = value.strip().lower()
    return next((role for role in ROLES if role == name), None)


def _text(value: str) -> str | None:
    return value.strip().lower() or None


def _flag(value: str) -> bool:
    return True


def _key_list(value: str) -> tuple[str, ...] | None:
    keys = tuple(key.strip() for key in value.split(",") if key.strip())
    return keys or None


PARSERS: Mapping[str, ValueParser] = {
    "depth": _depth,
    "position": _text,
    "role": _role,
    "activate_only_after": _non_negative_int,
    "activate_only_every": _positive_int,
    "dont_activate": _flag,
    "activate": _flag,
    "scan_depth": _non_negative_int,
    "additional_keys": _key_list,
    "exclude_keys": _key_list,
}


@dataclass(frozen=True)
class ParsedContent:
    decorators: Decorators
    content: str


def _split_line(line: str) -> tuple[int, str, str]:
    """`@@@name value` -> (3, "name", "value")."""
    num_ats = len(line) - len(line.lstrip("@"))
    name, _, value = line[num_ats:].partition(" ")
    return num_ats, name.strip().lower(), value


def _decorator_lines(content: str) -> tuple[list[str], str]:
    lines = content.split("\n")
    index = 0
    while index < len(lines) and not lines[index].strip():
        index += 1
    start = index
    while index < len(lines) and lines[index].lstrip().startswith("@@"):
        index += 1
    if index == start:
        return [], content
    return [line.strip() for line in lines[start:index]], "\n".join(lines[index:])


def parse_decorators(content: str) -> ParsedContent:
    """Split the leading decorator lines off `content` and interpret them."""
    if "@@" not in content:
        return ParsedContent(Decorators(), content)
    lines, rest = _decorator_lines(content)
    values: dict[str, Any] = {}
    ignored: list[str] = []
    chain_applied = True
    for line in lines:
        num_ats, name, value = _split_line(line)
        if num_ats > 2 and chain_applied:
            continue  # a fallback whose primary (or an earlier fallback) already applied
        chain_applied = _apply(name, value, values, ignored)
    decorators = replace(Decorators(), **values, ignored=tuple(ignored))
    return ParsedContent(decorators, rest.strip("\r\n"))


def _apply(name: str, value: str, values: dict[str, Any], ignored: list[str]) -> bool:
    parser = PARSERS.get(name)
    parsed = None if parser is None else parser(value)
    if parsed is None or name in values:
        ignored.append(name)
        return name in values  # a repeat of an applied name counts as applied
    values[name] = parsed
    return True
