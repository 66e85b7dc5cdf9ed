"""Text <-> token ids: a `tokenizers` backend built from GGUF metadata or a Hugging Face folder.

Knows BOS/EOS, whether BOS is prepended, and the stop tokens that end a chat turn. Does not
render chat templates (`chat_template.py`) or stream text deltas (`detokenizer.py`).
GGUF vocabularies follow llama.cpp: `gpt2` (byte-level BPE, split regex chosen by
`tokenizer.ggml.pre`) and `llama` (SentencePiece BPE with byte fallback).
"""

from __future__ import annotations

import json
import logging
import mmap
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from talkloop.engine.errors import ModelLoadError, UnsupportedModelError

logger = logging.getLogger(__name__)

# Texts that end a turn in common chat formats; a stop token when the vocabulary has it as special.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "<|return|>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
)

# llama.cpp's token types (tokenizer.ggml.token_type).
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# ---------------------------------------------------------------- GGUF metadata

_GGUF_MAGIC = b"GGUF"
# GGUF value type id -> struct format of one value (8 = string, 9 = array are handled apart).
_GGUF_SCALARS = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every key/value of a GGUF file's header as plain Python values; tensors are not read.

    NOTE: `gguf.GGUFReader` builds a numpy view per array element (about 2 s for a 49k vocab);
    this reads the same header with `struct` in a few tens of milliseconds.
    """
    path = Path(path)
    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse_gguf_header(buf, path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read GGUF metadata from {path}: {exc}") from exc
    except struct.error as exc:
        raise ModelLoadError(f"GGUF file {path} is truncated or corrupt: {exc}") from exc


def _parse_gguf_header(buf: mmap.mmap, path: Path) -> dict[str, Any]:
    magic, version = buf[:4], struct.unpack_from("<I", buf, 4)[0]
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    if version not in (2, 3):
        raise UnsupportedModelError(f"{path} is GGUF version {version}; versions 2 and 3 are read")
    num_kv = struct.unpack_from("<Q", buf, 16)[0]
    metadata: dict[str, Any] = {}
    offset = 24
    for _ in range(num_kv):
        key, offset = _read_gguf_string(buf, offset)
        value_type = struct.unpack_from("<I", buf, offset)[0]
        metadata[key], offset = _read_gguf_value(buf, offset + 4, value_type)
    return metadata


def _read_gguf_string(buf: mmap.mmap, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, offset)
    end = offset + 8 + length
    return buf[offset + 8 : end].decode("utf-8", errors="replace"), end


def _read_gguf_value(buf: mmap.mmap, offset: int, value_type: int) -> tuple[Any, int]:
    if value_type == _GGUF_STRING:
        return _read_gguf_string(buf, offset)
    if value_type == _GGUF_ARRAY:
        item_type, length = struct.unpack_from("<IQ", buf, offset)
        offset += 12
        if item_type in _GGUF_SCALARS:
            fmt = f"<{length}{_GGUF_SCALARS[item_type]}"
            return list(struct.unpack_from(fmt, buf, offset)), offset + struct.calcsize(fmt)
        items = []
        for _ in range(length):
            item, offset = _read_gguf_value(buf, offset, item_type)
            items.append(item)
        return items, offset
    if value_type not in _GGUF_SCALARS:
        raise ValueError(f"unknown GGUF value type {value_type} at byte {offset}")
    fmt = "<" + _GGUF_SCALARS[value_type]
    return struct.unpack_from(fmt, buf, offset)[0], offset + struct.calcsize(fmt)


# ---------------------------------------------------------------- pre-tokenizers


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How a byte-level BPE vocabulary splits text before merging (llama.cpp `tokenizer.ggml.pre`).

    Each regex in turn cuts every piece so far, its matches isolated (llama.cpp's
    `unicode_regex_split`, HF's `Split(behavior="isolated")`); then the pieces are spelled in
    GPT-2's byte alphabet. `ignore_merges` takes a whole piece that is itself in the vocabulary
    without merging; `add_bos` is llama.cpp's default when the file has no add_bos_token key
    (both set for Llama 3 and Tekken).
    """

    split_regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False

    def build(self) -> pre_tokenizers.PreTokenizer:
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in self.split_regexes]
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([*splits, byte_level])


# The regexes of each model's own tokenizer.json (llama.cpp spells `(?i:...)` out by hand).
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
TEKKEN_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CJK = "[一-龥ࠀ-一가-퟿]+"
DEEPSEEK_CODER_SPLITS = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")
DEEPSEEK_LLM_SPLITS = (
    r"[\r\n]",
    # Cased letters as DeepSeek's tokenizer.json lists them (escaped: NFC would fold some).
    r"\s?["
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-"
    "\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-"
    "\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
    "\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00"
    "-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-"
    "\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-"
    "\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-"
    "\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149"
    "\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13"
    "-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943"
    "]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    _CJK,
    r"\p{N}+",
)
DEEPSEEK_V3_SPLITS = (
    r"\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
FALCON_SPLITS = (r"[\p{P}\$\+<=>\^~\|`]+", GPT2_SPLIT, "[0-9][0-9][0-9]")


def _family(names: str, spec: PreTokenizerSpec) -> dict[str, PreTokenizerSpec]:
    return dict.fromkeys(names.split(), spec)


# `tokenizer.ggml.pre` value -> split rule, grouped as llama.cpp's llama-vocab.cpp groups them.
# NOTE: llama.cpp's "default" is a legacy multi-regex guess; HF and this map use GPT-2's regex.
PRE_TOKENIZERS: Mapping[str, PreTokenizerSpec] = MappingProxyType(
    _family(
        "default gpt2 gpt-2 phi-2 mpt olmo jais trillion exaone4 mellum roberta-bpe",
        PreTokenizerSpec((GPT2_SPLIT,)),
    )
    | _family(
        "smollm starcoder refact command-r codeshell exaone minerva-7b",
        PreTokenizerSpec((r"\p{N}", GPT2_SPLIT)),
    )
    | _family(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2",
        PreTokenizerSpec((LLAMA3_SPLIT,), ignore_merges=True, add_bos=True),
    )
    | _family("dbrx smaug-bpe", PreTokenizerSpec((LLAMA3_SPLIT,)))
    | _family(
        "qwen2 deepseek-r1-qwen kormo megrez stablelm2 hunyuan", PreTokenizerSpec((QWEN2_SPLIT,))
    )
    | _family("qwen35", PreTokenizerSpec((QWEN35_SPLIT,)))
    | _family("tekken", PreTokenizerSpec((TEKKEN_SPLIT,), ignore_merges=True, add_bos=True))
    | _family("gpt-4o llama4 minimax-m2", PreTokenizerSpec((GPT4O_SPLIT,)))
    | _family("deepseek-coder", PreTokenizerSpec(DEEPSEEK_CODER_SPLITS))
    | _family("deepseek-llm", PreTokenizerSpec(DEEPSEEK_LLM_SPLITS))
    | _family("deepseek-v3 hunyuan-dense", PreTokenizerSpec(DEEPSEEK_V3_SPLITS))
    | _family("falcon", PreTokenizerSpec(FALCON_SPLITS))
)


# ---------------------------------------------------------------- GGUF vocabularies


def _gguf_array(metadata: Mapping[str, Any], key: str) -> list[Any]:
    value = metadata.get(key)
    if not isinstance(value, list) or not value:
        raise ModelLoadError(f"GGUF metadata has no {key!r} array; the file carries no tokenizer")
    return value


def _gguf_merges(metadata: Mapping[str, Any]) -> list[tuple[str, str]]:
    """`tokenizer.ggml.merges` ("Ġ t" pairs; no token of either kind holds a plain space)."""
    merges = _gguf_array(metadata, "tokenizer.ggml.merges")
    return [(left, right) for left, _, right in (merge.partition(" ") for merge in merges)]


def _pre_tokenizer_spec(metadata: Mapping[str, Any]) -> PreTokenizerSpec:
    if "tokenizer.ggml.pre" not in metadata:
        logger.warning("GGUF metadata has no tokenizer.ggml.pre; splitting text as GPT-2 does")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        known = ", ".join(sorted(PRE_TOKENIZERS))
        raise UnsupportedModelError(f"tokenizer.ggml.pre {pre!r} is not supported; known: {known}")
    return spec


def _byte_level_backend(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE: vocabulary and merges as stored, split rule from `pre`."""
    tokens = _gguf_array(metadata, "tokenizer.ggml.tokens")
    spec = _pre_tokenizer_spec(metadata)
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    model = models.BPE(vocab=vocab, merges=_gguf_merges(metadata), ignore_merges=spec.ignore_merges)
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = spec.build()
    backend.decoder = decoders.ByteLevel()
    return backend


def _gguf_add_bos(metadata: Mapping[str, Any]) -> bool:
    """The file's add_bos_token, else llama.cpp's default for its vocabulary kind."""
    if "tokenizer.ggml.add_bos_token" in metadata:
        return bool(metadata["tokenizer.ggml.add_bos_token"])
    if metadata.get("tokenizer.ggml.model") == "llama":
        return True
    return _pre_tokenizer_spec(metadata).add_bos


def _sentencepiece_backend(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """SentencePiece BPE as llama.cpp runs it: best-scoring merge first, unknown bytes as <0xNN>."""
    tokens = _gguf_array(metadata, "tokenizer.ggml.tokens")
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    if "tokenizer.ggml.merges" in metadata:
        merges = _gguf_merges(metadata)
    else:
        merges = _merges_from_scores(tokens, _gguf_array(metadata, "tokenizer.ggml.scores"))
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[unk_id] if isinstance(unk_id, int) and unk_id < len(tokens) else None
    model = models.BPE(vocab=vocab, merges=merges, unk_token=unk_token, byte_fallback=True)
    backend = tokenizers.Tokenizer(model)
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    escape = [normalizers.Replace(" ", "▁")]
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), *escape] if add_space_prefix else escape
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(
        [*steps, decoders.Strip(" ", 1, 0)] if add_space_prefix else steps
    )
    return backend


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best merged score first.

    NOTE: SentencePiece merges the adjacent pair whose concatenation scores highest; a BPE with
    every such pair ranked by that score picks the same pair at each step.
    """
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for token_id, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[token_id], token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


_GGUF_BACKENDS = {"gpt2": _byte_level_backend, "llama": _sentencepiece_backend}


def _add_gguf_special_tokens(backend: tokenizers.Tokenizer, metadata: Mapping[str, Any]) -> None:
    """Control (and unknown) tokens become special, user-defined ones plain added tokens.

    Both are matched whole in raw text, as llama.cpp does, so `<|im_start|>` is one id.
    """
    tokens = metadata["tokenizer.ggml.tokens"]
    token_types = metadata.get("tokenizer.ggml.token_type") or []
    special = {TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN}
    backend.add_special_tokens(
        [
            AddedToken(tokens[token_id], special=True, normalized=False)
            for token_id, token_type in enumerate(token_types)
            if token_type in special
        ]
    )
    backend.add_tokens(
        [
            AddedToken(tokens[token_id], special=False, normalized=False)
            for token_id, token_type in enumerate(token_types)
            if token_type == TOKEN_TYPE_USER_DEFINED
        ]
    )


def _gguf_chat_templates(metadata: Mapping[str, Any]) -> dict[str, str]:
    """`tokenizer.chat_template` as "default", plus `tokenizer.chat_template.<name>` ones."""
    prefix = "tokenizer.chat_template."
    templates = {
        key.removeprefix(prefix): value
        for key, value in metadata.items()
        if key.startswith(prefix) and isinstance(value, str)
    }
    if isinstance(metadata.get("tokenizer.chat_template"), str):
        templates["default"] = metadata["tokenizer.chat_template"]
    return templates


# ---------------------------------------------------------------- Hugging Face folders


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _folder_chat_templates(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Templates from tokenizer_config.json (string or list of {name, template}), or from the
    separate chat_template.jinja / chat_template.json files newer exports write."""
    templates: dict[str, str] = {}
    value = config.get("chat_template")
    if isinstance(value, str):
        templates["default"] = value
    elif isinstance(value, list):
        templates.update(
            (item["name"], item["template"])
            for item in value
            if isinstance(item, dict) and "name" in item and "template" in item
        )
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "chat_template.json").is_file():
        value = _read_json(folder / "chat_template.json").get("chat_template")
        if isinstance(value, str):
            templates["default"] = value
    return templates


def _generation_eos_ids(folder: Path) -> list[int]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    value = _read_json(path).get("eos_token_id")
    ids = value if isinstance(value, list) else [value]
    return [token_id for token_id in ids if isinstance(token_id, int)]


def _backend_adds_bos(backend: tokenizers.Tokenizer, bos_token_id: int | None) -> bool:
    """Whether the folder's post-processor prepends BOS (for configs without add_bos_token)."""
    if bos_token_id is None:
        return False
    ids = backend.encode("a", add_special_tokens=True).ids
    return len(ids) > len(backend.encode("a", add_special_tokens=False).ids) and (
        ids[0] == bos_token_id
    )


# ---------------------------------------------------------------- the tokenizer


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """A model's tokenizer: ids for text, text for ids, and the tokens that stop generation.

    BOS/EOS are added by `encode` itself (`add_bos`, `add_eos`), never by a backend
    post-processor, so both loaders behave alike.
    """

    backend: tokenizers.Tokenizer = field(repr=False)
    bos_token_id: int | None
    eos_token_id: int | None
    stop_token_ids: frozenset[int]
    add_bos: bool = False
    add_eos: bool = False
    chat_templates: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """The tokenizer stored in a GGUF file's metadata."""
        return cls.from_gguf_metadata(read_gguf_metadata(path))

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer of already-read GGUF metadata (key -> plain str/int/bool/list)."""
        kind = metadata.get("tokenizer.ggml.model")
        build = _GGUF_BACKENDS.get(kind) if isinstance(kind, str) else None
        if build is None:
            raise UnsupportedModelError(
                f"tokenizer.ggml.model {kind!r} is not supported; "
                f"supported: {', '.join(sorted(_GGUF_BACKENDS))}"
            )
        backend = build(metadata)
        _add_gguf_special_tokens(backend, metadata)
        bos_id, eos_id = (metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
        turn_ends = [metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        return cls(
            backend=backend,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            stop_token_ids=_stop_token_ids(backend, [eos_id, *turn_ends]),
            add_bos=_gguf_add_bos(metadata),
            add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
            chat_templates=MappingProxyType(_gguf_chat_templates(metadata)),
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """A Hugging Face tokenizer folder: tokenizer.json plus, when present,
        tokenizer_config.json, generation_config.json and chat_template.jinja."""
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise ModelLoadError(f"{folder} has no tokenizer.json (a Hugging Face fast tokenizer)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise ModelLoadError(f"cannot load {folder / 'tokenizer.json'}: {exc}") from exc
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        bos_id, eos_id = (
            _known_id(backend, _token_text(config.get(k))) for k in ("bos_token", "eos_token")
        )
        add_bos = config.get("add_bos_token")
        return cls(
            backend=backend,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            stop_token_ids=_stop_token_ids(backend, [eos_id, *_generation_eos_ids(folder)]),
            add_bos=_backend_adds_bos(backend, bos_id) if add_bos is None else bool(add_bos),
            add_eos=bool(config.get("add_eos_token", False)),
            chat_templates=MappingProxyType(_folder_chat_templates(folder, config)),
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding may be padded larger)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self.id_to_token(self.eos_token_id)

    @property
    def chat_template(self) -> str | None:
        """The model's default Jinja chat template, if it ships one."""
        return self.chat_templates.get("default")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in it (`<|im_start|>`) become one id.

        `add_special_tokens` adds BOS/EOS when the model asks for them (`add_bos`, `add_eos`).
        NOTE: a byte-level vocabulary may lack a few bytes (SmolLM2: some ASCII controls, 0xF1);
        characters needing them are dropped, as HF tokenizers and llama.cpp drop them.
        """
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if add_special_tokens and self.add_eos and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (a character cut between tokens) decodes as U+FFFD."""
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of `token_id` (byte-level spelling, e.g. "Ġhello"), or None."""
        token: str | None = self.backend.id_to_token(token_id)
        return token

    def token_to_id(self, token: str) -> int | None:
        token_id: int | None = self.backend.token_to_id(token)
        return token_id

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special token (dropped by skip_special_tokens)."""
        added = self.backend.get_added_tokens_decoder().get(token_id)
        return added is not None and added.special

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json, loadable by `from_folder` and HF."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
        }
        if set(self.chat_templates) == {"default"}:
            config["chat_template"] = self.chat_template
        elif self.chat_templates:
            config["chat_template"] = [
                {"name": name, "template": source} for name, source in self.chat_templates.items()
            ]
        text = json.dumps(config, indent=2, ensure_ascii=False)
        (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")


def _known_id(backend: tokenizers.Tokenizer, token: str | None) -> int | None:
    return None if token is None else backend.token_to_id(token)


def _stop_token_ids(backend: tokenizers.Tokenizer, ids: Sequence[Any]) -> frozenset[int]:
    """The given ids plus every end-of-turn token the vocabulary has as a special token."""
    special = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    turn_ends = {special[text] for text in END_OF_TURN_TOKENS if text in special}
    return frozenset({i for i in ids if isinstance(i, int)} | turn_ends)
