"""`StructuredOutput`: the shape a request's output must take (JSON, JSON Schema, regex, choice).

Plain data, checked for shape only (types, empty values). Whether a schema or pattern compiles is
decided by `grammar.py` against the tokenizer, so this module needs no grammar library.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from talkloop.engine.errors import InvalidRequestError

StructuredKind = Literal["json_object", "json_schema", "regex", "choice"]
PARAM = "response_format"


def _refuse(message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{PARAM} {message}", param=PARAM)


@dataclass(frozen=True)
class StructuredOutput:
    """One constraint on the whole output. Build it with the class methods, e.g.
    `StructuredOutput.from_json_schema({...})`; a bad spec raises `InvalidRequestError`."""

    kind: StructuredKind
    json_schema: Mapping[str, Any] | None = None  # kind "json_schema"
    regex: str | None = None  # kind "regex": Rust `regex` syntax, matched by the whole output
    choices: tuple[str, ...] = ()  # kind "choice": the output is exactly one of them
    # Canonical text of the constraint. NOTE: grammars compile from this snapshot, so mutating
    # `json_schema` after construction changes neither the cache key nor the grammar.
    text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check = _CHECKS.get(self.kind)
        if check is None:
            raise _refuse(f"type {self.kind!r} is not one of {', '.join(_CHECKS)}")
        object.__setattr__(self, "choices", tuple(self.choices))
        object.__setattr__(self, "text", check(self))

    @property
    def key(self) -> str:
        """Equal for specs that compile alike: the compiled-grammar cache key."""
        return f"{self.kind}:{self.text}"

    @classmethod
    def json_object(cls) -> StructuredOutput:
        """Any JSON object."""
        return cls("json_object")

    @classmethod
    def from_json_schema(cls, schema: Mapping[str, Any]) -> StructuredOutput:
        return cls("json_schema", json_schema=schema)

    @classmethod
    def from_regex(cls, pattern: str) -> StructuredOutput:
        return cls("regex", regex=pattern)

    @classmethod
    def from_choices(cls, choices: Sequence[str]) -> StructuredOutput:
        return cls("choice", choices=tuple(choices))

    @classmethod
    def from_response_format(cls, response_format: Mapping[str, Any]) -> StructuredOutput | None:
        """OpenAI's `response_format` (`text`, `json_object`, `json_schema`), plus talkloop's
        `{"type": "regex", "regex": ...}` and `{"type": "choice", "choices": [...]}`.
        `text` means unconstrained: None."""
        kind = response_format.get("type")
        parse = _RESPONSE_FORMATS.get(kind) if isinstance(kind, str) else None
        if parse is None:
            raise _refuse(f"type {kind!r} is not one of {', '.join(_RESPONSE_FORMATS)}")
        return parse(response_format)


# ---------------------------------------------------------------- shape checks (one per kind)
# Each returns the spec's canonical text: two specs with the same text compile alike.
# NOTE: a schema's key order is kept (no sort_keys): properties are generated in that order.


def _only(spec: StructuredOutput, *allowed: str) -> None:
    given = {"json_schema": spec.json_schema is not None, "regex": spec.regex is not None}
    given["choices"] = bool(spec.choices)
    extra = sorted(name for name, is_set in given.items() if is_set and name not in allowed)
    if extra:
        raise _refuse(f"type {spec.kind!r} takes no {', '.join(extra)}")


def _check_json_object(spec: StructuredOutput) -> str:
    _only(spec)
    return ""


def _check_json_schema(spec: StructuredOutput) -> str:
    _only(spec, "json_schema")
    if not isinstance(spec.json_schema, Mapping):
        got = type(spec.json_schema).__name__
        raise _refuse(f"json_schema must be a JSON Schema object (a dict), got {got}")
    try:
        return json.dumps(spec.json_schema, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise _refuse(f"json_schema is not plain JSON: {exc}") from exc


def _check_regex(spec: StructuredOutput) -> str:
    _only(spec, "regex")
    if not isinstance(spec.regex, str) or not spec.regex:
        raise _refuse(f"regex must be a non-empty pattern string, got {spec.regex!r}")
    return spec.regex


def _check_choices(spec: StructuredOutput) -> str:
    _only(spec, "choices")
    if not spec.choices:
        raise _refuse("choices must list at least one string")
    bad = [c for c in spec.choices if not isinstance(c, str) or not c]
    if bad:
        raise _refuse(f"choices must be non-empty strings, got {bad[0]!r}")
    return json.dumps(list(spec.choices), ensure_ascii=False)


_CHECKS: dict[str, Callable[[StructuredOutput], str]] = {
    "json_object": _check_json_object,
    "json_schema": _check_json_schema,
    "regex": _check_regex,
    "choice": _check_choices,
}


# ---------------------------------------------------------------- OpenAI response_format


def _field(response_format: Mapping[str, Any], name: str) -> Any:
    if name not in response_format:
        raise _refuse(f"of type {response_format['type']!r} needs a {name!r} field")
    return response_format[name]


def _json_schema_format(response_format: Mapping[str, Any]) -> StructuredOutput:
    wrapper = _field(response_format, "json_schema")
    if not isinstance(wrapper, Mapping) or "schema" not in wrapper:
        raise _refuse('json_schema must be an object with a "schema" field (and a "name")')
    return StructuredOutput.from_json_schema(wrapper["schema"])


def _choice_format(response_format: Mapping[str, Any]) -> StructuredOutput:
    choices = _field(response_format, "choices")
    if isinstance(choices, str) or not isinstance(choices, Sequence):
        raise _refuse(f"choices must be a list of strings, got {type(choices).__name__}")
    return StructuredOutput.from_choices(choices)


_RESPONSE_FORMATS: dict[str, Callable[[Mapping[str, Any]], StructuredOutput | None]] = {
    "text": lambda _: None,
    "json_object": lambda _: StructuredOutput.json_object(),
    "json_schema": _json_schema_format,
    "regex": lambda rf: StructuredOutput.from_regex(_field(rf, "regex")),
    "choice": _choice_format,
}
