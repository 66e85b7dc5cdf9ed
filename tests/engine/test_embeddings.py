"""Embedder and the BERT encoder on the bundled all-MiniLM-L6-v2: parity with `transformers`,
sentence similarity, batching == one at a time, truncation, and the archive extraction."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from talkloop.engine import embeddings
from talkloop.engine.assets import package_file
from talkloop.engine.embeddings import MODEL_PACKAGE, MODEL_ZIP, NEEDED_FILES, Embedder
from talkloop.engine.errors import InvalidRequestError, ModelLoadError

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "",
    "long " * 400,
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return embeddings.extract_model(
        package_file(MODEL_PACKAGE, MODEL_ZIP), tmp_path_factory.mktemp("cache")
    )


@pytest.fixture(scope="module")
def embedder(model_dir: Path) -> Embedder:
    return Embedder.from_folder(model_dir, batch_size=4)


def test_embeddings_match_transformers_bert_mean_pooled_and_normalised(
    embedder: Embedder, model_dir: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    reference_model = transformers.BertModel.from_pretrained(str(model_dir)).eval()
    ids = embedder.tokenize(TEXTS)
    width = max(len(row) for row in ids)
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    with torch.no_grad():
        hidden = reference_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    weights = mask[:, :, None].float()
    expected = F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=1)
    ours = embedder.encode(TEXTS)
    assert ours.shape == (len(TEXTS), 384)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_similar_sentences_are_closer_than_unrelated_ones(embedder: Embedder) -> None:
    vectors = embedder.encode(TEXTS[:4])
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(4))
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.7  # eating food / eating bread
    assert similarity[0, 1] > similarity[0, 2] + 0.5  # ... vs carrying a baby
    assert similarity[0, 3] > similarity[0, 2]  # a man doing something beats a girl


def test_batched_and_unsorted_input_equals_one_at_a_time(embedder: Embedder) -> None:
    together = embedder.encode(TEXTS)
    alone = torch.cat([embedder.encode([text]) for text in TEXTS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert embedder.encode([]).shape == (0, 384)


def test_texts_are_truncated_at_256_tokens_with_cls_and_sep(embedder: Embedder) -> None:
    ids = embedder.tokenize(["long " * 400, "hello world"])
    assert len(ids[0]) == 256
    assert ids[0][0] == embedder.cls_id and ids[0][-1] == embedder.sep_id
    assert ids[1] == [101, 7592, 2088, 102]


def test_token_id_input_is_framed_and_checked(embedder: Embedder) -> None:
    assert embedder.wrap_ids([7592, 2088]) == [101, 7592, 2088, 102]
    torch.testing.assert_close(
        embedder.encode_ids([embedder.wrap_ids([7592, 2088])]), embedder.encode(["hello world"])
    )
    assert len(embedder.wrap_ids([7592] * 1000)) == 256
    with pytest.raises(InvalidRequestError, match=r"token id 30522, outside the vocabulary") as e:
        embedder.wrap_ids([1, 30522], param="input[2]")
    assert e.value.param == "input[2]"


def test_extraction_is_reused_and_leaves_only_the_model_folder(
    model_dir: Path, tmp_path: Path
) -> None:
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(NEEDED_FILES)
    zip_path = package_file(MODEL_PACKAGE, MODEL_ZIP)
    assert embeddings.extract_model(zip_path, model_dir.parent) == model_dir  # no re-extraction
    assert [p.name for p in model_dir.parent.iterdir()] == [model_dir.name]


def test_an_archive_over_the_size_limit_is_refused_and_nothing_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embeddings, "MAX_EXTRACT_BYTES", 1 << 20)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="exceeds the extraction limit of 1 MiB"):
        embeddings.extract_model(package_file(MODEL_PACKAGE, MODEL_ZIP), cache)
    assert list(cache.iterdir()) == []


def test_an_archive_without_the_model_files_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "model.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("config.json", "{}")
    with pytest.raises(ModelLoadError, match="is not the expected model archive"):
        embeddings.extract_model(bad, tmp_path / "cache")
