"""IncrementalDetokenizer: deltas concatenate to the full decode, never split a character."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from talkloop.engine.assets import default_model_path
from talkloop.engine.detokenizer import MAX_HELD_TOKENS, NUM_CONTEXT_TOKENS, IncrementalDetokenizer
from talkloop.engine.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path())


def _byte_token_ids(tokenizer: Tokenizer) -> dict[int, int]:
    """byte -> id of the token spelling that single byte (GPT-2 byte alphabet)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    alphabet = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    ids = {b: tokenizer.token_to_id(alphabet[b]) for b in range(256)}
    return {b: i for b, i in ids.items() if i is not None}


@pytest.fixture(scope="module")
def byte_ids(smollm: Tokenizer) -> dict[int, int]:
    return _byte_token_ids(smollm)


def _stream(
    tokenizer: Tokenizer, ids: Sequence[int], skip_special_tokens: bool = True
) -> tuple[list[str], str]:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = [detokenizer.step(token_id) for token_id in ids]
    return deltas, detokenizer.flush()


def test_emoji_split_across_byte_tokens_is_held_back(
    smollm: Tokenizer, byte_ids: dict[int, int]
) -> None:
    ids = [byte_ids[b] for b in "🦙".encode()] + smollm.encode(" ok")
    deltas, tail = _stream(smollm, ids)
    assert deltas == ["", "", "", "🦙", " ok"]
    assert tail == ""


@pytest.mark.parametrize("text", ["Hi 👋🏽 👨‍👩‍👧‍👦!", "你好世界，日本語のテキスト", "🏳️‍🌈🇫🇷 naïve"])
def test_multibyte_text_streams_whole_characters(smollm: Tokenizer, text: str) -> None:
    ids = smollm.encode(text)
    deltas, tail = _stream(smollm, ids)
    assert "".join(deltas) + tail == text
    assert not any(REPLACEMENT in delta for delta in deltas)
    assert sum(1 for delta in deltas if delta) < len(ids)  # some tokens were held back


def test_special_tokens_skipped_or_kept(smollm: Tokenizer) -> None:
    ids = smollm.encode("<|im_start|>assistant\nHello<|im_end|>")
    skipped, _ = _stream(smollm, ids, skip_special_tokens=True)
    kept, _ = _stream(smollm, ids, skip_special_tokens=False)
    assert "".join(skipped) == "assistant\nHello"
    assert (kept[0], kept[-1]) == ("<|im_start|>", "<|im_end|>")
    assert "".join(kept) == "<|im_start|>assistant\nHello<|im_end|>"


def test_unfinished_character_at_the_end_flushes_as_replacement(
    smollm: Tokenizer, byte_ids: dict[int, int]
) -> None:
    ids = smollm.encode("ok") + [byte_ids[b] for b in "🦙".encode()[:3]]
    deltas, tail = _stream(smollm, ids)
    assert deltas == ["ok", "", "", ""]
    assert tail == REPLACEMENT == smollm.decode(ids[1:])


def test_invalid_bytes_mid_text_are_emitted_once_settled(
    smollm: Tokenizer, byte_ids: dict[int, int]
) -> None:
    # 0xE2 0x82 starts "€" but "A" does not continue it: the two bytes are one U+FFFD.
    ids = [byte_ids[0xE2], byte_ids[0x82], *smollm.encode("A")]
    deltas, tail = _stream(smollm, ids)
    assert deltas == ["", "", REPLACEMENT + "A"]
    assert "".join(deltas) + tail == smollm.decode(ids)


def test_prompt_context_keeps_the_first_tokens_text(smollm: Tokenizer) -> None:
    prompt = smollm.encode("<|im_start|>assistant\n")
    generated = smollm.encode(" Hello there")
    detokenizer = IncrementalDetokenizer(smollm, prompt_token_ids=prompt)
    text = "".join(detokenizer.step(token_id) for token_id in generated) + detokenizer.flush()
    assert text == " Hello there"


def test_prompt_context_keeps_sentencepiece_leading_space() -> None:
    pieces = ["▁", "h", "i", "▁hi", "hi"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    tokenizer = Tokenizer.from_gguf_metadata(
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0],
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
        }
    )
    prompt, generated = tokenizer.encode("hi"), tokenizer.encode(" hi hi", add_special_tokens=False)
    with_context = IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt)
    text = "".join(with_context.step(i) for i in generated) + with_context.flush()
    full = tokenizer.decode(prompt + generated, skip_special_tokens=True)
    assert text == full[len(tokenizer.decode(prompt, skip_special_tokens=True)) :] == "  hi hi"
    alone = IncrementalDetokenizer(tokenizer)
    text = "".join(alone.step(i) for i in generated) + alone.flush()
    assert text == tokenizer.decode(generated) == " hi hi"


# ------------------------------------------------ properties


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
@example(text="<|endoftext|>")  # a special token's spelling encodes as that token
def test_random_text_concatenates_to_full_decode(smollm: Tokenizer, text: str) -> None:
    ids = smollm.encode(text)
    for skip in (True, False):
        deltas, tail = _stream(smollm, ids, skip_special_tokens=skip)
        assert "".join(deltas) + tail == smollm.decode(ids, skip_special_tokens=skip)
    deltas, tail = _stream(smollm, ids)
    full = smollm.decode(ids, skip_special_tokens=True)
    if REPLACEMENT not in full:
        assert not any(REPLACEMENT in delta for delta in deltas)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), skip_special_tokens=st.booleans())
def test_random_ids_concatenate_to_full_decode(
    smollm: Tokenizer, byte_ids: dict[int, int], data: st.DataObject, skip_special_tokens: bool
) -> None:
    """Any ids, valid UTF-8 or not: high bytes, special tokens and ordinary tokens mixed."""
    high_bytes = st.sampled_from([i for b, i in byte_ids.items() if b >= 0x80])
    any_token = st.integers(0, smollm.vocab_size - 1)
    special = st.integers(0, 16)
    token = st.one_of(high_bytes, high_bytes, any_token, special)
    ids = data.draw(st.lists(token, max_size=40))
    deltas, tail = _stream(smollm, ids, skip_special_tokens)
    assert "".join(deltas) + tail == smollm.decode(ids, skip_special_tokens=skip_special_tokens)


# ------------------------------------------------ cost per step


class CountingDecoder:
    """Records how many ids each decode call covers."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.window_sizes: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        self.window_sizes.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_a_small_window(smollm: Tokenizer) -> None:
    ids = smollm.encode("Once upon a time, 🦙 llamas wrote 日本語 poems. " * 40)
    counter = CountingDecoder(smollm)
    detokenizer = IncrementalDetokenizer(counter, prompt_token_ids=ids[:50])
    text = "".join(detokenizer.step(token_id) for token_id in ids) + detokenizer.flush()
    assert text == smollm.decode(ids)
    assert max(counter.window_sizes) <= NUM_CONTEXT_TOKENS + 4
    assert len(counter.window_sizes) <= 2 * len(ids) + 2


def test_long_invalid_byte_runs_stay_bounded(smollm: Tokenizer, byte_ids: dict[int, int]) -> None:
    # 0xF0 0x9F starts an emoji each time and is never finished: every step ends in U+FFFD.
    ids = [byte_ids[0xF0], byte_ids[0x9F]] * 200 + smollm.encode(" end")
    counter = CountingDecoder(smollm)
    detokenizer = IncrementalDetokenizer(counter)
    deltas = [detokenizer.step(token_id) for token_id in ids]
    assert "".join(deltas) + detokenizer.flush() == smollm.decode(ids)
    assert max(counter.window_sizes) <= MAX_HELD_TOKENS + 2
    assert sum(1 for delta in deltas[:400] if delta) > 50  # emitted while streaming
