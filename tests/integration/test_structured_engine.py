"""Constrained decoding through the engine on the bundled model: output parses and validates."""

from __future__ import annotations

import json
import re

import jsonschema_rs
import pytest

from talkloop.engine.config import CacheConfig, EngineConfig
from talkloop.engine.errors import InvalidRequestError
from talkloop.engine.loader import build_engine, load_model
from talkloop.engine.sampling_params import SamplingParams
from talkloop.engine.structured.spec import StructuredOutput

pytestmark = pytest.mark.integration

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "curious"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine():
    config = EngineConfig(dtype="bfloat16", cache=CacheConfig(kv_cache_bytes=64 << 20))
    loaded = load_model(config)
    return build_engine(config, loaded), loaded


def _run(engine, loaded, prompt: str, params: SamplingParams) -> list[str]:
    rendered = loaded.chat_template.render([{"role": "user", "content": prompt}])
    ids = loaded.tokenizer.encode(rendered, add_special_tokens=False)
    engine.add_request("s", ids, params)
    texts = [""] * params.n
    while engine.has_unfinished_requests():
        for out in engine.step():
            for d in out.deltas:
                texts[d.index] += d.text
    return texts


def test_json_schema_outputs_validate_greedy_and_sampled(engine) -> None:
    llm, loaded = engine
    prompt = "Describe a character as JSON with name, age, mood and tags."
    for params in (
        SamplingParams(
            max_tokens=120, temperature=0.0, structured=StructuredOutput.from_json_schema(SCHEMA)
        ),
        SamplingParams(
            max_tokens=120,
            temperature=1.0,
            seed=3,
            n=3,
            structured=StructuredOutput.from_json_schema(SCHEMA),
        ),
    ):
        for text in _run(llm, loaded, prompt, params):
            assert jsonschema_rs.validator_for(SCHEMA).is_valid(json.loads(text)), text


def test_regex_and_choice(engine) -> None:
    llm, loaded = engine
    date = _run(
        llm,
        loaded,
        "When is the festival?",
        SamplingParams(
            max_tokens=30,
            temperature=0.0,
            structured=StructuredOutput.from_regex(r"\d{4}-\d{2}-\d{2}"),
        ),
    )[0]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date)
    pick = _run(
        llm,
        loaded,
        "Who should speak next?",
        SamplingParams(
            max_tokens=10,
            temperature=0.0,
            structured=StructuredOutput.from_choices(["Corvo", "Fenn"]),
        ),
    )[0]
    assert pick in ("Corvo", "Fenn")


def test_bad_schema_is_refused_before_queueing(engine) -> None:
    llm, _ = engine
    with pytest.raises(InvalidRequestError):
        llm.add_request(
            "bad",
            [1, 2, 3],
            SamplingParams(structured=StructuredOutput.from_regex("(unclosed")),
        )
    assert not llm.has_unfinished_requests()


def test_finished_grammar_stops_even_with_ignore_eos_and_logprobs_stay_finite(engine) -> None:
    llm, loaded = engine
    rendered = loaded.chat_template.render([{"role": "user", "content": "yes or no?"}])
    ids = loaded.tokenizer.encode(rendered, add_special_tokens=False)
    params = SamplingParams(
        max_tokens=20,
        temperature=0.0,
        ignore_eos=True,
        logprobs=5,
        structured=StructuredOutput.from_choices(["yes", "no"]),
    )
    llm.add_request("c", ids, params)
    text, reason, logprobs = "", None, []
    while llm.has_unfinished_requests():
        for out in llm.step():
            text += out.deltas[0].text
            reason = out.deltas[0].finish_reason or reason
            logprobs += out.deltas[0].logprobs or ()
    assert text in ("yes", "no") and reason == "stop"
    assert all(v > float("-inf") for lp in logprobs for _, v in lp.top)
