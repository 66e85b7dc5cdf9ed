"""Constrained decoding: spec checks, compile errors, the grammar cache, random walks on the
bundled tokenizer (every finished output parses and validates), matcher state (EOS forcing,
rollback), batched masking, and greedy runs of the bundled model under a grammar."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from typing import Any

import jsonschema_rs
import pytest
import torch

from talkloop.engine.assets import default_model_path
from talkloop.engine.config import EngineConfig
from talkloop.engine.errors import InvalidRequestError
from talkloop.engine.loader import LoadedModel, load_model
from talkloop.engine.sampling_params import SamplingParams
from talkloop.engine.structured.bitmask import (
    apply_grammar_masks,
    blocked_tokens,
    fill_bitmasks,
    unpack_bitmask,
)
from talkloop.engine.structured.grammar import GrammarCompiler, check_structured_output
from talkloop.engine.structured.matcher import GrammarMatcher, GrammarViolationError
from talkloop.engine.structured.spec import StructuredOutput
from talkloop.engine.tokenizer import Tokenizer
from tests.engine.tiny import full_logits

Spec = StructuredOutput


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer)


def _walk(compiler: GrammarCompiler, spec: Spec, seed: int) -> tuple[list[int], GrammarMatcher]:
    """Random allowed tokens until an EOS token is drawn.

    Half the draws are uniform over the whole mask, half over its 16 lowest ids (single bytes:
    quotes, brackets, digits), so strings and arrays end in a few dozen tokens.
    """
    rng = random.Random(seed)
    matcher = compiler.matcher(spec)
    output: list[int] = []
    for _ in range(4000):
        allowed = matcher.allowed_mask().nonzero().flatten().tolist()
        token_id = rng.choice(allowed if rng.random() < 0.5 else allowed[:16])
        matcher.advance(token_id)
        if token_id in compiler.eos_token_ids:
            return output, matcher
        output.append(token_id)
    raise AssertionError(f"no EOS after 4000 tokens: {output[:50]}")


# ---------------------------------------------------------------- spec shape


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Spec("yaml"), "type 'yaml' is not one of json_object"),  # type: ignore[arg-type]
        (lambda: Spec.from_json_schema([1, 2]), "must be a JSON Schema object"),  # type: ignore[arg-type]
        (lambda: Spec.from_json_schema({"x": {1, 2}}), "is not plain JSON"),
        (lambda: Spec.from_json_schema({"maximum": float("nan")}), "is not plain JSON"),
        (lambda: Spec.from_regex(""), "regex must be a non-empty pattern"),
        (lambda: Spec.from_choices([]), "choices must list at least one string"),
        (lambda: Spec.from_choices(["a", ""]), "choices must be non-empty strings, got ''"),
        (lambda: Spec.from_choices(["a", 3]), "choices must be non-empty strings, got 3"),  # type: ignore[list-item]
        (lambda: Spec("regex", regex="a", choices=("a",)), "type 'regex' takes no choices"),
        (lambda: Spec("json_object", regex="a"), "type 'json_object' takes no regex"),
        (lambda: Spec.from_response_format({"type": "xml"}), "type 'xml' is not one of text"),
        (lambda: Spec.from_response_format({"type": "json_schema"}), "needs a 'json_schema'"),
        (
            lambda: Spec.from_response_format({"type": "json_schema", "json_schema": {}}),
            'with a "schema" field',
        ),
        (lambda: Spec.from_response_format({"type": "choice", "choices": "ab"}), "list of"),
    ],
)
def test_bad_spec_is_refused_naming_response_format(build: Callable[[], Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(message)) as info:
        build()
    assert info.value.param == "response_format"
    assert str(info.value).startswith("response_format ")


def test_response_format_maps_to_specs() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    wrapped = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert Spec.from_response_format({"type": "text"}) is None
    assert Spec.from_response_format({"type": "json_object"}) == Spec.json_object()
    assert Spec.from_response_format(wrapped) == Spec.from_json_schema(schema)
    assert Spec.from_response_format({"type": "regex", "regex": "a+"}) == Spec.from_regex("a+")
    choice = Spec.from_response_format({"type": "choice", "choices": ["a", "b"]})
    assert choice == Spec.from_choices(("a", "b")) and choice is not None
    assert choice.choices == ("a", "b")


def test_sampling_params_carries_a_spec() -> None:
    spec = Spec.from_regex("[0-9]+")
    assert SamplingParams(structured=spec).structured is spec
    assert SamplingParams().structured is None
    with pytest.raises(InvalidRequestError, match="must be a StructuredOutput") as info:
        SamplingParams(structured={"type": "json_object"})  # type: ignore[arg-type]
    assert info.value.param == "structured"


# ---------------------------------------------------------------- compile errors and cache

BAD_GRAMMARS = [
    (Spec.from_json_schema({"type": "objectx"}), "Invalid type: objectx"),
    (Spec.from_json_schema({"not": {"type": "string"}}), 'Unimplemented keys: ["not"]'),
    (
        Spec.from_json_schema({"type": "array", "minItems": 3, "maxItems": 1}),
        "minItems (3) is greater than maxItems (1)",
    ),
    (Spec.from_json_schema({"$ref": "#/$defs/missing"}), "'/$defs/missing' does not exist"),
    (Spec.from_json_schema({"type": "integer", "minimum": "zero"}), "Expected f64 for 'minimum'"),
    (Spec.from_json_schema({"type": "string", "pattern": "(?=a)"}), "look-around"),
    (Spec.from_regex("a(b"), "unclosed group"),
    (Spec.from_regex("(?<=a)b"), "look-around"),
    (Spec.from_regex(r"(a|b)\1"), "backreferences are not supported"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_GRAMMARS)
def test_bad_schema_or_regex_is_refused(
    compiler: GrammarCompiler, spec: Spec, message: str
) -> None:
    for compile_it in (compiler.compile, check_structured_output):
        with pytest.raises(InvalidRequestError, match=re.escape(message)) as info:
            compile_it(spec)
        assert info.value.param == "response_format"
        assert str(info.value).startswith("response_format ")
        assert "cannot be compiled" in str(info.value)


def test_compiled_grammars_are_cached_lru(tokenizer: Tokenizer) -> None:
    small = GrammarCompiler(tokenizer, cache_size=2)
    a, b, c = (Spec.from_regex(p) for p in ("a+", "b+", "c+"))
    first = small.compile(a)
    assert small.compile(Spec.from_regex("a+")) is first  # equal text, same grammar
    small.compile(b)
    small.compile(a)  # a is now the most recent
    small.compile(c)  # evicts b
    assert small.num_cached == 2
    assert small.compile(a) is first
    assert small.compile(b) is not small.compile(c)


def test_cache_key_keeps_property_order() -> None:
    ab = {"type": "object", "properties": {"a": {}, "b": {}}}
    ba = {"type": "object", "properties": {"b": {}, "a": {}}}
    assert Spec.from_json_schema(ab).key != Spec.from_json_schema(ba).key
    assert Spec.from_json_schema(ab).key == Spec.from_json_schema(json.loads(json.dumps(ab))).key


# ---------------------------------------------------------------- random walks: output is valid

SCHEMAS: dict[str, dict[str, Any]] = {
    "object_required": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "open_object": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "note": {"type": "string", "maxLength": 10}},
        "required": ["id"],
    },
    "array": {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "maximum": 5},
        "minItems": 1,
        "maxItems": 4,
    },
    "string_lengths": {"type": "string", "minLength": 2, "maxLength": 8},
    "string_pattern": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"},
    "number_range": {"type": "number", "minimum": 0, "maximum": 1},
    "integer": {"type": "integer"},
    "integer_range": {"type": "integer", "minimum": 10, "maximum": 99},
    "boolean": {"type": "boolean"},
    "enum": {"enum": ["red", "green", "blue", 3, None]},
    "const": {"const": {"k": [1, 2]}},
    "nullable": {"anyOf": [{"type": "null"}, {"type": "number", "maximum": 100}]},
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}},
                    "role": {"enum": ["admin", "guest"]},
                },
                "required": ["id", "tags", "role"],
                "additionalProperties": False,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["user", "ok"],
        "additionalProperties": False,
    },
    "memory_facts": {
        "type": "object",
        "properties": {
            "facts": {
                "type": "array",
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "subject": {"type": "string", "maxLength": 20},
                        "fact": {"type": "string", "maxLength": 40},
                        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                    },
                    "required": ["subject", "fact", "confidence"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["facts"],
        "additionalProperties": False,
    },
    "recursive_ref": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
                },
                "required": ["v"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_walk_output_parses_and_validates(
    compiler: GrammarCompiler, tokenizer: Tokenizer, name: str
) -> None:
    schema = SCHEMAS[name]
    validator = jsonschema_rs.validator_for(schema)
    for seed in range(6):
        output, matcher = _walk(compiler, Spec.from_json_schema(schema), seed)
        text = tokenizer.decode(output)
        value = json.loads(text)
        assert validator.is_valid(value), (seed, text)
        assert matcher.is_finished


def test_json_object_walk_gives_objects(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    for seed in range(6):
        output, _ = _walk(compiler, Spec.json_object(), seed)
        assert isinstance(json.loads(tokenizer.decode(output)), dict)


def test_json_is_compact(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"const": 1}}}}
    output, _ = _walk(compiler, Spec.from_json_schema(schema), seed=3)
    text = tokenizer.decode(output)
    assert text == json.dumps(json.loads(text)), text  # ", " and ": " separators, no newlines


@pytest.mark.parametrize(
    "pattern",
    [
        r"\d{3}-\d{4}",
        r"(yes|no|maybe)",
        r"[A-Z][a-z]{1,8}( [A-Z][a-z]{1,8})?",
        r"[a-z]+@[a-z]+\.(com|org)",
        r"-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,3})?",
        r"caf(é|e) ☕{1,3}",
    ],
)
def test_regex_walk_fully_matches(
    compiler: GrammarCompiler, tokenizer: Tokenizer, pattern: str
) -> None:
    for seed in range(6):
        output, _ = _walk(compiler, Spec.from_regex(pattern), seed)
        text = tokenizer.decode(output)
        assert re.fullmatch(pattern, text), (seed, text)


@pytest.mark.parametrize(
    "choices",
    [
        ("yes", "yes, sir", "no"),
        ("Corvo", "Fenn", "Poppy", "Vellum", "Hush"),
        ('say "hi"', "naïve ☕", "back\\slash", "two\nlines", "😀 grin"),
    ],
)
def test_choice_walk_is_one_of_the_choices(
    compiler: GrammarCompiler, tokenizer: Tokenizer, choices: tuple[str, ...]
) -> None:
    seen = set()
    for seed in range(12):
        output, _ = _walk(compiler, Spec.from_choices(choices), seed)
        text = tokenizer.decode(output)
        assert text in choices, (seed, text)
        seen.add(text)
    assert len(seen) > 1


SPM_PIECES = ["▁", "a", "b", "c", "é", "ab", "bc", "ca", "▁a", "▁b", "abc", "▁ab", "cc"]


def _sentencepiece_tokenizer() -> Tokenizer:
    """A tiny llama-style (SentencePiece, byte fallback) vocabulary: "▁" spaces, <0xNN> bytes."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    return Tokenizer.from_gguf_metadata(
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))],
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES),
            "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
        }
    )


@pytest.mark.parametrize("pattern", [r"[abc]{2,6}( [abc]{1,4})?", r"é+ (ab|ü)"])
def test_sentencepiece_vocabulary_walk_fully_matches(pattern: str) -> None:
    tokenizer = _sentencepiece_tokenizer()
    compiler = GrammarCompiler(tokenizer)
    assert compiler.eos_token_ids == (2,)
    for seed in range(6):
        output, _ = _walk(compiler, Spec.from_regex(pattern), seed)
        assert re.fullmatch(pattern, tokenizer.decode(output)), (seed, output)


# ---------------------------------------------------------------- matcher state


def _ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_finished_grammar_allows_only_eos(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    matcher = compiler.matcher(Spec.from_choices(["Fenn", "Hush"]))
    assert not matcher.is_finished and not matcher.is_accepting
    for token_id in _ids(tokenizer, "Fenn"):
        matcher.advance(token_id)
    assert matcher.is_finished and matcher.is_accepting
    allowed = matcher.allowed_mask().nonzero().flatten().tolist()
    assert allowed == sorted(compiler.eos_token_ids) == sorted(tokenizer.stop_token_ids)
    matcher.advance(tokenizer.eos_token_id or 0)
    assert matcher.is_finished


def test_accepting_grammar_allows_eos_and_more(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    matcher = compiler.matcher(Spec.from_regex("[0-9]+"))
    matcher.advance(_ids(tokenizer, "7")[0])
    allowed = matcher.allowed_mask()
    assert matcher.is_accepting and not matcher.is_finished
    assert all(allowed[t] for t in compiler.eos_token_ids)
    assert allowed[_ids(tokenizer, "8")[0]] and not allowed[_ids(tokenizer, "a")[0]]


def test_disallowed_token_raises(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    matcher = compiler.matcher(Spec.from_choices(["yes", "no"]))
    token_id = _ids(tokenizer, "maybe")[0]
    with pytest.raises(GrammarViolationError, match=f"token {token_id} is not allowed after 0"):
        matcher.advance(token_id)


def test_rollback_restores_earlier_masks(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    spec = Spec.from_json_schema(SCHEMAS["object_required"])
    tokens = _ids(tokenizer, '{"name": "Vellum", "age": 41}')
    matcher = compiler.matcher(spec)
    masks = []
    for token_id in tokens:
        masks.append(matcher.allowed_mask())
        matcher.advance(token_id)
    assert matcher.is_finished
    matcher.rollback(3)
    assert matcher.num_tokens == len(tokens) - 3
    assert torch.equal(matcher.allowed_mask(), masks[-3])
    for token_id in tokens[-3:]:
        matcher.advance(token_id)
    assert matcher.is_finished
    with pytest.raises(ValueError, match=f"cannot roll back {len(tokens) + 1} tokens"):
        matcher.rollback(len(tokens) + 1)
    matcher.rollback(len(tokens))
    assert torch.equal(matcher.allowed_mask(), masks[0])


def test_count_valid_and_copy(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    matcher = compiler.matcher(Spec.from_regex("[a-z]+ [0-9]+"))
    draft = _ids(tokenizer, "abc 12") + _ids(tokenizer, "!")
    assert matcher.count_valid(draft) == len(draft) - 1
    assert matcher.num_tokens == 0
    twin = matcher.copy()
    twin.advance(draft[0])
    assert (twin.num_tokens, matcher.num_tokens) == (1, 0)
    assert not torch.equal(twin.allowed_mask(), matcher.allowed_mask())


def test_bitmask_row_is_checked(compiler: GrammarCompiler) -> None:
    matcher = compiler.matcher(Spec.json_object())
    with pytest.raises(ValueError, match=r"must have shape \(1536,\)"):
        matcher.fill_bitmask(torch.zeros(1540, dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous int32"):
        matcher.fill_bitmask(torch.zeros(1536, dtype=torch.int64))


# ---------------------------------------------------------------- batched masking


def test_unpack_bitmask_matches_bit_arithmetic() -> None:
    words = torch.randint(-(2**31), 2**31 - 1, (3, 3), dtype=torch.int32)
    words[0, 2] = -(2**31)  # bit 31 alone
    expected = [
        [bool((int(words[r, t // 32]) >> (t % 32)) & 1) for t in range(70)] for r in range(3)
    ]
    assert unpack_bitmask(words, 70).tolist() == expected
    for num_columns in (60, 70, 80):  # a truncated, an exact, a padded embedding
        blocked = blocked_tokens(words, 70, num_columns, eos_token_ids=[1])
        assert blocked.shape == (3, num_columns)
        assert blocked[:, :60].tolist() == [[not bit for bit in row[:60]] for row in expected]
        assert bool(blocked[:, 70:].all())
    nothing = torch.zeros(1, 3, dtype=torch.int32)
    assert blocked_tokens(nothing, 70, 70, [5, 9]).logical_not().nonzero().tolist() == [
        [0, 5],
        [0, 9],
    ]


def _batch_matchers(compiler: GrammarCompiler, tokenizer: Tokenizer) -> list[GrammarMatcher | None]:
    started = compiler.matcher(Spec.from_json_schema(SCHEMAS["nested"]))
    for token_id in _ids(tokenizer, '{"user": {"id": 4'):
        started.advance(token_id)
    finished = compiler.matcher(Spec.from_choices(["Hush"]))
    for token_id in _ids(tokenizer, "Hush"):
        finished.advance(token_id)
    return [started, None, finished, compiler.matcher(Spec.from_regex("[0-9]{2}")), None]


@pytest.mark.parametrize("padding", [0, 64])
def test_apply_masks_sets_minus_inf_where_disallowed(
    compiler: GrammarCompiler, tokenizer: Tokenizer, padding: int
) -> None:
    matchers = _batch_matchers(compiler, tokenizer)
    logits = torch.randn(len(matchers), compiler.vocab_size + padding)
    before = logits.clone()
    apply_grammar_masks(logits, matchers, compiler.executor)
    for row, matcher in enumerate(matchers):
        if matcher is None:
            assert torch.equal(logits[row], before[row])
            continue
        expected = torch.zeros(logits.shape[1], dtype=torch.bool)
        expected[: compiler.vocab_size] = matcher.allowed_mask()
        assert torch.equal(torch.isfinite(logits[row]), expected)
        assert torch.equal(logits[row][expected], before[row][expected])
    assert torch.isfinite(logits[2]).nonzero().flatten().tolist() == sorted(compiler.eos_token_ids)


def test_parallel_and_sequential_fills_agree(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    constrained = [m for m in _batch_matchers(compiler, tokenizer) if m is not None]
    assert torch.equal(fill_bitmasks(constrained), fill_bitmasks(constrained, compiler.executor))


def test_matcher_in_error_state_is_forced_to_eos(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    matcher = compiler.matcher(Spec.from_choices(["yes"]))
    matcher.ll_matcher.consume_token(_ids(tokenizer, "no")[0])  # bypasses advance's check
    logits = torch.zeros(1, compiler.vocab_size)
    apply_grammar_masks(logits, [matcher])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == sorted(compiler.eos_token_ids)


def test_unconstrained_batch_is_untouched() -> None:
    logits = torch.randn(3, 10)
    before = logits.clone()
    apply_grammar_masks(logits, [None, None, None])
    assert torch.equal(logits, before)


# ---------------------------------------------------------------- the bundled model


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(EngineConfig(dtype="bfloat16"))


@torch.inference_mode()
def _greedy_constrained(loaded: LoadedModel, question: str, matcher: GrammarMatcher) -> str:
    """Naive greedy decoding under a grammar: full recompute per token, mask, argmax, advance."""
    rendered = loaded.chat_template.render([{"role": "user", "content": question}])
    tokens = loaded.tokenizer.encode(rendered, add_special_tokens=False)
    output: list[int] = []
    for _ in range(48):
        logits = full_logits(loaded.model, tokens + output)[-1:]  # [1, V]
        apply_grammar_masks(logits, [matcher])
        token_id = int(logits.argmax(dim=-1))
        matcher.advance(token_id)
        if token_id in loaded.tokenizer.stop_token_ids:
            return loaded.tokenizer.decode(output)
        output.append(token_id)
    raise AssertionError(f"no EOS in 48 tokens: {loaded.tokenizer.decode(output)!r}")


@pytest.mark.integration
def test_bundled_model_writes_valid_json(loaded: LoadedModel) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 999},
            "mood": {"enum": ["happy", "sad", "angry", "calm"]},
        },
        "required": ["name", "age", "mood"],
        "additionalProperties": False,
    }
    compiler = GrammarCompiler(loaded.tokenizer)
    matcher = compiler.matcher(Spec.from_json_schema(schema))
    text = _greedy_constrained(
        loaded, "Describe a pirate captain as JSON with a name, an age and a mood.", matcher
    )
    assert jsonschema_rs.validator_for(schema).is_valid(json.loads(text)), text


@pytest.mark.integration
def test_bundled_model_picks_a_choice(loaded: LoadedModel) -> None:
    compiler = GrammarCompiler(loaded.tokenizer)
    choices = ("Corvo", "Fenn", "Poppy")
    matcher = compiler.matcher(Spec.from_choices(choices))
    text = _greedy_constrained(loaded, "Who speaks next: Corvo, Fenn or Poppy?", matcher)
    assert text in choices
