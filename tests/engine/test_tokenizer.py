"""Tokenizer: GGUF and folder loading, parity with independent references, bad input."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import gguf
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from talkloop.engine.assets import default_model_path
from talkloop.engine.errors import ModelLoadError, UnsupportedModelError
from talkloop.engine.tokenizer import (
    PRE_TOKENIZERS,
    Tokenizer,
    read_gguf_metadata,
)

PARITY_TEXTS = [
    "Hello, world!",
    " leading space",
    "trailing space ",
    "  multiple   spaces\t\ttabs \t ",
    "line one\nline two\n\n\nthree\r\nwindows\r\n",
    "I'm sure they'll say it's fine; we've done what we'd planned. DON'T SHOUT, YOU'RE LOUD",
    "Numbers: 0 7 42 1234567890 3.14159 -273.15 1e-9 2,048 ½ ² ٣٤ 10⁶",
    "naïve café déjà vu — “quotes” and ‘single’ … Ünïcödé",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji: 👋🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷 🦙🦙",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x != 0: pass\n",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "inline <|endoftext|> special and <|im_end|>glued<|im_start|>",
    "https://example.com/path?q=1&r=2#frag  email@example.org",
    "Ελληνικά, русский, العربية, עברית, हिन्दी, ไทย",
    "\u200b zero width \u00a0nbsp \ufeff bom \u0301 combining",
    "",
    " ",
    "\n",
    "a",
    "x" * 300 + " " + "ab" * 100,
    "<repo_name>talkloop<file_sep>main.py",
]


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def metadata() -> dict[str, Any]:
    return read_gguf_metadata(default_model_path())


# ------------------------------------------------ an independent reference: llama.cpp's algorithm

GPT2_REGEX = regex.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}


class ReferenceSmolLM:
    """SmolLM's tokenizer written out plainly, as llama.cpp's `smollm` pre-type runs it:
    special tokens whole, then each digit alone, then GPT-2's regex, then BPE by merge rank."""

    def __init__(self, metadata: dict[str, Any]) -> None:
        tokens = metadata["tokenizer.ggml.tokens"]
        self.vocab = {token: i for i, token in enumerate(tokens)}
        self.ranks = {
            tuple(m.split(" ")): r for r, m in enumerate(metadata["tokenizer.ggml.merges"])
        }
        specials = [
            t
            for t, kind in zip(tokens, metadata["tokenizer.ggml.token_type"], strict=True)
            if kind == 3
        ]
        specials.sort(key=len, reverse=True)
        self.special_split = regex.compile("(" + "|".join(map(regex.escape, specials)) + ")")
        self.alphabet = _byte_alphabet()

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for segment in self.special_split.split(text):
            if segment in self.vocab and self.special_split.fullmatch(segment):
                ids.append(self.vocab[segment])
                continue
            for piece in regex.split(r"(\p{N})", segment):
                words = GPT2_REGEX.findall(piece)
                assert "".join(words) == piece
                for word in words:
                    # A byte the vocabulary lacks is dropped (llama.cpp and HF alike).
                    ids += [self.vocab[t] for t in self._bpe(word) if t in self.vocab]
        return ids

    def _bpe(self, word: str) -> list[str]:
        symbols = [self.alphabet[b] for b in word.encode("utf-8")]
        while len(symbols) > 1:
            pairs = [
                (self.ranks.get(p, 1 << 30), i) for i, p in enumerate(itertools.pairwise(symbols))
            ]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        return symbols


@pytest.fixture(scope="module")
def reference(metadata: dict[str, Any]) -> ReferenceSmolLM:
    return ReferenceSmolLM(metadata)


# ------------------------------------------------ the bundled SmolLM2 GGUF


def test_bundled_gguf_metadata(smollm: Tokenizer) -> None:
    assert smollm.vocab_size == 49152
    assert (smollm.bos_token_id, smollm.eos_token_id) == (1, 2)
    assert (smollm.bos_token, smollm.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smollm.add_bos is False
    # <|im_end|> is EOS; <|endoftext|> ends a document and stops generation too.
    assert smollm.stop_token_ids == frozenset({0, 2})
    assert smollm.chat_template is not None
    assert smollm.chat_template.startswith("{% for message in messages %}")
    assert smollm.id_to_token(19556) == "Hello"
    assert smollm.token_to_id("Ġworld") == 905
    assert smollm.token_to_id("no such token") is None
    assert smollm.is_special(1) and not smollm.is_special(19556)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello, we can use", [19556, 28, 392, 416, 722]),
        ("Hello world! 123", [19556, 905, 17, 216, 33, 34, 35]),
        ("Café déjà vu.", [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30]),
        ("  multiple   spaces", [216, 2701, 256, 5600]),
        ("\n", [198]),
        ("<|im_start|>user\nHi<|im_end|>", [1, 4093, 198, 26843, 2]),
    ],
)
def test_golden_ids(smollm: Tokenizer, text: str, expected: list[int]) -> None:
    assert smollm.encode(text) == expected


@pytest.mark.parametrize("text", PARITY_TEXTS)
def test_parity_with_plain_reference(
    smollm: Tokenizer, reference: ReferenceSmolLM, text: str
) -> None:
    assert smollm.encode(text, add_special_tokens=False) == reference.encode(text)


# Bytes SmolLM's vocabulary cannot spell: six ASCII controls, and 0xF1/0xF2, which lead planes 4-11.
UNSPELLABLE = "\x04\x06\x13\x14\x16\x1d"
SPELLABLE = st.characters(codec="utf-8", max_codepoint=0x3FFFF, exclude_characters=UNSPELLABLE)


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=SPELLABLE, max_size=40))
def test_parity_with_plain_reference_on_random_text(
    smollm: Tokenizer, reference: ReferenceSmolLM, text: str
) -> None:
    ids = smollm.encode(text)
    assert ids == reference.encode(text)
    assert smollm.decode(ids) == text


@pytest.fixture(scope="module")
def transformers_gguf_tokenizer() -> Any:
    """transformers' own GGUF -> tokenizer conversion, offline."""
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# NOTE: transformers splits SmolLM text with plain GPT-2 ByteLevel: it does not isolate each
# \p{N} character as SmolLM's tokenizer.json (Digits, individual) and llama.cpp do. ASCII digits
# still agree (this vocabulary never merges them), but " ²" becomes one token there, two here.
NUMERIC_TEXT = PARITY_TEXTS[6]


@pytest.mark.parametrize("text", [t for t in PARITY_TEXTS if t != NUMERIC_TEXT])
def test_parity_with_transformers_gguf_conversion(
    smollm: Tokenizer, transformers_gguf_tokenizer: Any, text: str
) -> None:
    expected = transformers_gguf_tokenizer.encode(text, add_special_tokens=False)
    assert smollm.encode(text, add_special_tokens=False) == expected
    assert smollm.decode(expected) == transformers_gguf_tokenizer.decode(expected)


def test_transformers_gguf_conversion_differs_only_on_non_ascii_numerals(
    smollm: Tokenizer, transformers_gguf_tokenizer: Any, reference: ReferenceSmolLM
) -> None:
    ascii_digits = "x 1234567890 3.14 -2,048"
    assert smollm.encode(ascii_digits) == transformers_gguf_tokenizer.encode(ascii_digits)
    superscript = "x ²"
    assert smollm.encode(superscript) == reference.encode(superscript)
    assert smollm.encode(superscript) != transformers_gguf_tokenizer.encode(superscript)


@pytest.mark.parametrize("text", PARITY_TEXTS)
def test_decode_round_trips(smollm: Tokenizer, text: str) -> None:
    assert smollm.decode(smollm.encode(text)) == text


def test_special_tokens_inline_are_single_ids(smollm: Tokenizer) -> None:
    ids = smollm.encode("a<|im_start|>b<|im_end|><|endoftext|>")
    assert ids[1] == 1 and ids[-2:] == [2, 0]
    assert smollm.decode(ids, skip_special_tokens=True) == "ab"
    assert smollm.decode(ids) == "a<|im_start|>b<|im_end|><|endoftext|>"


def test_unspellable_bytes_are_dropped_as_hf_and_llama_cpp_do(smollm: Tokenizer) -> None:
    assert smollm.decode(smollm.encode("a\x04b")) == "ab"
    # U+40000 is F1 80 80 80: the lead byte goes, the continuation bytes stay (and are invalid).
    assert smollm.decode(smollm.encode("\U00040000")) == "\ufffd" * 3


def test_invalid_utf8_decodes_as_replacement(smollm: Tokenizer) -> None:
    emoji_ids = smollm.encode("🦙")
    assert len(emoji_ids) > 1
    assert smollm.decode(emoji_ids[:-1]).endswith("\ufffd")


def test_add_bos_and_eos_when_the_model_asks(smollm: Tokenizer) -> None:
    with_bos = dataclasses.replace(smollm, add_bos=True, add_eos=True)
    assert with_bos.encode("Hi") == [1, *smollm.encode("Hi"), 2]
    assert with_bos.encode("Hi", add_special_tokens=False) == smollm.encode("Hi")


# ------------------------------------------------ GGUF reading and bad input


def _write_gguf(path: Path, fields: dict[str, Any]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def test_read_gguf_metadata_matches_gguf_reader(tmp_path: Path) -> None:
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.bos_token_id": 7,
        "tokenizer.ggml.add_bos_token": True,
        "some.float": 0.5,
        "tokenizer.ggml.tokens": ["a", "b", "ab", "ü"],
        "tokenizer.ggml.scores": [0.0, -1.5, -2.0, -3.0],
    }
    _write_gguf(tmp_path / "tiny.gguf", fields)
    ours = read_gguf_metadata(tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(tmp_path / "tiny.gguf")
    assert {k: reader.fields[k].contents() for k in fields} == {k: ours[k] for k in fields}
    assert ours["general.architecture"] == "llama"


def test_not_a_gguf_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not gguf at all" + bytes(32))
    with pytest.raises(ModelLoadError, match=r"model\.gguf is not a GGUF file"):
        Tokenizer.from_gguf(path)


def test_truncated_gguf_is_named(tmp_path: Path) -> None:
    _write_gguf(tmp_path / "full.gguf", {"tokenizer.ggml.tokens": ["x"] * 100})
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        read_gguf_metadata(tmp_path / "cut.gguf")


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"nope\.gguf"):
        Tokenizer.from_gguf(tmp_path / "nope.gguf")


def test_unsupported_tokenizer_model_is_named(metadata: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedModelError, match=r"tokenizer\.ggml\.model 'bert'.*gpt2, llama"):
        Tokenizer.from_gguf_metadata(metadata | {"tokenizer.ggml.model": "bert"})


def test_unknown_pre_tokenizer_is_named(metadata: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedModelError, match=r"tokenizer\.ggml\.pre 'kimi-k2'"):
        Tokenizer.from_gguf_metadata(metadata | {"tokenizer.ggml.pre": "kimi-k2"})


def test_missing_vocabulary_is_named(metadata: dict[str, Any]) -> None:
    without = {k: v for k, v in metadata.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(ModelLoadError, match=r"no 'tokenizer\.ggml\.merges' array"):
        Tokenizer.from_gguf_metadata(without)


def test_every_pre_tokenizer_compiles() -> None:
    for name, spec in PRE_TOKENIZERS.items():
        assert spec.build() is not None, name


def test_named_gguf_templates(metadata: dict[str, Any]) -> None:
    extra = {"tokenizer.chat_template.tool_use": "{{ tools }}"}
    tokenizer = Tokenizer.from_gguf_metadata(metadata | extra)
    assert set(tokenizer.chat_templates) == {"default", "tool_use"}


# ------------------------------------------------ SentencePiece (tokenizer.ggml.model = llama)

SPM_PIECES = ["▁", "a", "b", "c", "é", "ab", "bc", "ca", "▁a", "▁b", "abc", "▁ab", "▁abc", "cc"]
SPM_PIECES += ["bca", "▁c", "aa", "▁▁", "ba"]


def _spm_metadata() -> dict[str, Any]:
    """A tiny llama-style vocabulary: control tokens, 256 byte tokens, scored pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    # Scores are distinct and not in vocabulary order, so merge order is tested.
    scores = [0.0] * 259 + [-float((i * 7) % len(SPM_PIECES)) for i in range(len(SPM_PIECES))]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES),
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


def _reference_spm(metadata: dict[str, Any], text: str) -> list[int]:
    """llama.cpp's SPM tokenizer in plain code: prefix "▁", spaces -> "▁", then repeatedly
    merge the adjacent pair whose concatenation scores best (leftmost on ties); characters
    outside the vocabulary become <0xNN> byte tokens."""
    tokens, scores = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.scores"]
    vocab = {t: i for i, t in enumerate(tokens)}
    symbols = list(("▁" + text).replace(" ", "▁")) if text else []
    while True:
        pairs = [
            (scores[vocab[a + b]], -i) for i, (a, b) in enumerate(itertools.pairwise(symbols))
            if a + b in vocab
        ]  # fmt: skip
        if not pairs:
            break
        _, negative_index = max(pairs)
        i = -negative_index
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    ids: list[int] = []
    for symbol in symbols:
        if symbol in vocab:
            ids.append(vocab[symbol])
        else:
            ids += [vocab[f"<0x{b:02X}>"] for b in symbol.encode("utf-8")]
    return ids


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(_spm_metadata())


def test_sentencepiece_defaults(spm: Tokenizer) -> None:
    assert spm.add_bos is True
    assert spm.encode("ab") == [1, *spm.encode("ab", add_special_tokens=False)]
    assert spm.stop_token_ids == frozenset({2})


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="abcé ü😀\n", max_size=24))
def test_sentencepiece_matches_plain_reference(spm: Tokenizer, text: str) -> None:
    ids = spm.encode(text, add_special_tokens=False)
    assert ids == _reference_spm(_spm_metadata(), text)
    assert spm.decode(ids) == text


# ------------------------------------------------ Hugging Face folders


@pytest.fixture(scope="module")
def saved_folder(smollm: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("smollm_tokenizer")
    smollm.save(folder)
    return folder


def test_folder_round_trip(smollm: Tokenizer, saved_folder: Path) -> None:
    loaded = Tokenizer.from_folder(saved_folder)
    assert (loaded.bos_token_id, loaded.eos_token_id) == (1, 2)
    assert loaded.add_bos is False
    assert loaded.stop_token_ids == smollm.stop_token_ids
    assert loaded.chat_template == smollm.chat_template
    for text in PARITY_TEXTS:
        assert loaded.encode(text) == smollm.encode(text)


def test_folder_parity_with_transformers_fast_tokenizer(
    smollm: Tokenizer, saved_folder: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(saved_folder / "tokenizer.json")
    )
    loaded = Tokenizer.from_folder(saved_folder)
    for text in PARITY_TEXTS:
        expected = reference.encode(text, add_special_tokens=False)
        assert loaded.encode(text, add_special_tokens=False) == expected
        assert loaded.decode(expected) == reference.decode(expected)


def _copy_tokenizer_json(source: Path, folder: Path, edit: Any = None) -> None:
    folder.mkdir()
    data = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    if edit is not None:
        edit(data)
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")


def test_folder_config_variants(saved_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "variant"
    _copy_tokenizer_json(saved_folder, folder)
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": "<|endoftext|>",
        "add_bos_token": True,
        "chat_template": [
            {"name": "default", "template": "{{ messages }}"},
            {"name": "rag", "template": "{{ documents }}"},
        ],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "generation_config.json").write_text('{"eos_token_id": [0, 2, 5]}')
    loaded = Tokenizer.from_folder(folder)
    assert (loaded.bos_token_id, loaded.eos_token_id) == (1, 0)
    assert loaded.encode("Hi")[0] == 1
    assert loaded.stop_token_ids == frozenset({0, 2, 5})
    assert dict(loaded.chat_templates) == {"default": "{{ messages }}", "rag": "{{ documents }}"}
    loaded.save(tmp_path / "resaved")
    resaved = Tokenizer.from_folder(tmp_path / "resaved")
    assert resaved.chat_templates == loaded.chat_templates
    assert (resaved.bos_token_id, resaved.eos_token_id, resaved.add_bos) == (1, 0, True)
    (folder / "chat_template.jinja").write_text("{{ 'from file' }}", encoding="utf-8")
    assert Tokenizer.from_folder(folder).chat_template == "{{ 'from file' }}"


def test_folder_without_config_infers_bos_from_post_processor(
    saved_folder: Path, tmp_path: Path
) -> None:
    def add_template(data: dict[str, Any]) -> None:
        bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
        text = {"Sequence": {"id": "A", "type_id": 0}}
        data["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [bos, text],
            "pair": [bos, text, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {
                "<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}
            },
        }

    folder = tmp_path / "post"
    _copy_tokenizer_json(saved_folder, folder, add_template)
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<|im_start|>"}')
    loaded = Tokenizer.from_folder(folder)
    assert loaded.add_bos is True
    assert loaded.encode("Hi") == [1, 26843]
    assert loaded.chat_template is None


def test_folder_errors_name_the_file(saved_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"has no tokenizer\.json"):
        Tokenizer.from_folder(tmp_path)
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"cannot load .*tokenizer\.json"):
        Tokenizer.from_folder(folder)
    good = tmp_path / "badconfig"
    _copy_tokenizer_json(saved_folder, good)
    (good / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match=r"tokenizer_config\.json holds a JSON list"):
        Tokenizer.from_folder(good)
