"""Compiles `StructuredOutput` specs into llguidance grammars for one tokenizer, with an LRU cache.

The only module that knows llguidance's grammar formats. A `GrammarCompiler` is built once per
tokenizer (about 0.2 s for a 49k vocabulary); compiling a spec builds a prototype matcher that
every sequence using the spec copies (a copy costs about a microsecond). Does not mask logits
(`bitmask.py`) or track a sequence (`matcher.py`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import llguidance

from talkloop.engine.errors import InvalidRequestError
from talkloop.engine.structured.matcher import GrammarMatcher
from talkloop.engine.structured.spec import PARAM, StructuredOutput
from talkloop.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

logger = logging.getLogger(__name__)

# Compact, OpenAI-like JSON: `{"a": 1, "b": [2, 3]}`. NOTE: flexible whitespace lets a small
# model pad the output with newlines forever; a fixed separator keeps JSON short and finite.
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


def _json_object_grammar(spec: StructuredOutput) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)


def _json_schema_grammar(spec: StructuredOutput) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(spec.text, defaults=JSON_OPTIONS)


def _regex_grammar(spec: StructuredOutput) -> str:
    return llguidance.LLMatcher.grammar_from_regex(spec.regex or "")


def _choice_grammar(spec: StructuredOutput) -> str:
    # Lark string literals take JSON's escapes.
    alternatives = " | ".join(json.dumps(choice) for choice in spec.choices)
    return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")


_GRAMMARS: dict[str, Callable[[StructuredOutput], str]] = {
    "json_object": _json_object_grammar,
    "json_schema": _json_schema_grammar,
    "regex": _regex_grammar,
    "choice": _choice_grammar,
}


def grammar_text(spec: StructuredOutput) -> str:
    """The llguidance grammar of `spec` (not yet checked)."""
    try:
        return _GRAMMARS[spec.kind](spec)
    except ValueError as exc:
        raise _invalid(spec, str(exc)) from exc


def check_structured_output(spec: StructuredOutput) -> None:
    """Refuse a spec whose schema or pattern cannot compile, without a tokenizer (for callers,
    such as a remote backend, that have none). Raises `InvalidRequestError`."""
    error = llguidance.LLMatcher.validate_grammar(grammar_text(spec))
    if error:
        raise _invalid(spec, error)


def _invalid(spec: StructuredOutput, error: str) -> InvalidRequestError:
    what = {"json_schema": "json_schema", "regex": "regex", "choice": "choices"}.get(spec.kind, "")
    # llguidance's regex errors span lines with a caret diagram; the first lines name the fault.
    detail = " ".join(error.strip().splitlines()[:4])
    return InvalidRequestError(f"{PARAM} {what} cannot be compiled: {detail}".strip(), PARAM)


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """A spec compiled for one tokenizer; `matcher()` starts a sequence on it."""

    key: str
    prototype: llguidance.LLMatcher  # NOTE: never advanced; only copied
    vocab_size: int
    eos_token_ids: tuple[int, ...]

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self.prototype.deep_copy(), self.vocab_size, self.eos_token_ids)


class GrammarCompiler:
    """Compiles specs for one tokenizer; the last `cache_size` compiled grammars are kept."""

    def __init__(
        self, tokenizer: Tokenizer, cache_size: int = 128, num_threads: int | None = None
    ) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.vocab_size = tokenizer.vocab_size
        self.eos_token_ids = _eos_token_ids(tokenizer)
        self.ll_tokenizer = llguidance.LLTokenizer(
            tokenizer.backend.to_str(),
            n_vocab=self.vocab_size,
            eos_token=list(self.eos_token_ids),
        )
        # Fills a batch's masks in parallel (llguidance drops the GIL while it works).
        self.executor = llguidance.LLExecutor(num_threads or min(4, os.cpu_count() or 1))
        self.cache_size = cache_size
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutput) -> CompiledGrammar:
        """The compiled grammar of `spec` (cached); a bad spec raises `InvalidRequestError`."""
        with self._lock:
            compiled = self._cache.get(spec.key)
            if compiled is not None:
                self._cache.move_to_end(spec.key)
                return compiled
        compiled = self._build(spec)
        with self._lock:
            self._cache[spec.key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        """A fresh matcher for one sequence constrained by `spec`."""
        return self.compile(spec).matcher()

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def _build(self, spec: StructuredOutput) -> CompiledGrammar:
        prototype = llguidance.LLMatcher(self.ll_tokenizer, grammar_text(spec), log_level=0)
        if prototype.is_error():
            raise _invalid(spec, prototype.get_error())
        for warning in prototype.get_grammar_warnings():
            logger.warning("structured output %s: %s", spec.kind, warning)
        return CompiledGrammar(spec.key, prototype, self.vocab_size, self.eos_token_ids)


def _eos_token_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The tokens a finished grammar allows: EOS first, then the other stop tokens."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids = tuple(dict.fromkeys([*eos, *sorted(tokenizer.stop_token_ids)]))
    if not ids:
        raise ValueError("the tokenizer has no EOS or stop token; structured output needs one")
    return ids
