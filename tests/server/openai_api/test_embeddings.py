"""`/v1/embeddings` through the official `openai` client: base64 (the SDK's default) and float,
text and token-id input, `dimensions`, errors, and one metered ledger row per request."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import openai
import pytest
import torch

from talkloop.backends.engine_backend import EngineBackend
from talkloop.engine.embeddings import MODEL_NAME, Embedder
from talkloop.server.openai_api.embeddings import run_compute
from tests.server.conftest import LiveServer

pytestmark = pytest.mark.integration

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
]


def _embedder(server: LiveServer) -> Embedder:
    embedder = server.app.state.embedder_slot.embedder
    assert isinstance(embedder, Embedder)
    return embedder


def test_sdk_default_base64_gives_the_embedders_vectors_in_order(
    server: LiveServer, client: openai.OpenAI
) -> None:
    reply = client.embeddings.create(model=MODEL_NAME, input=TEXTS)  # base64 on the wire
    assert reply.object == "list" and reply.model == MODEL_NAME
    assert [item.index for item in reply.data] == [0, 1, 2]
    vectors = torch.tensor([item.embedding for item in reply.data])
    embedder = _embedder(server)
    torch.testing.assert_close(vectors, embedder.encode(TEXTS), atol=0, rtol=0)
    assert (vectors[0] @ vectors[1]) > (vectors[0] @ vectors[2]) + 0.5
    num_tokens = sum(len(ids) for ids in embedder.tokenize(TEXTS))
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == num_tokens


def test_float_format_equals_base64_and_token_ids_equal_text(client: openai.OpenAI) -> None:
    as_base64 = client.embeddings.create(model=MODEL_NAME, input="hello world")
    as_float = client.embeddings.create(
        model=MODEL_NAME, input="hello world", encoding_format="float", dimensions=384
    )
    as_ids = client.embeddings.create(model=MODEL_NAME, input=[7592, 2088])
    as_id_lists = client.embeddings.create(model=MODEL_NAME, input=[[7592, 2088], [7592]])
    assert len(as_float.data[0].embedding) == 384
    assert as_float.data[0].embedding == as_base64.data[0].embedding
    assert as_ids.data[0].embedding == as_base64.data[0].embedding
    assert as_id_lists.data[0].embedding == as_base64.data[0].embedding
    assert as_ids.usage.prompt_tokens == 4  # [CLS] hello world [SEP]
    assert as_id_lists.usage.prompt_tokens == 4 + 3


def test_a_single_string_is_one_embedding(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model=f"sentence-transformers/{MODEL_NAME}", input="hi")
    assert len(reply.data) == 1 and reply.model == MODEL_NAME


@pytest.mark.parametrize(
    ("kwargs", "status", "param", "message"),
    [
        ({"dimensions": 256}, 400, "dimensions", "dimensions must be 384"),
        ({"model": "text-embedding-3-small"}, 404, "model", "available: ['all-MiniLM-L6-v2']"),
        ({"input": []}, 400, "input", "input must not be empty"),
        ({"input": [[1, 2], [5, 99999]]}, 400, "input[1]", "token id 99999, outside"),
        ({"input": ["x"] * 2049}, 400, "input", "at most 2048 items"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(
    client: openai.OpenAI, kwargs: dict[str, object], status: int, param: str, message: str
) -> None:
    request: dict[str, object] = {"model": MODEL_NAME, "input": "hello", **kwargs}
    with pytest.raises(openai.APIStatusError) as caught:
        client.embeddings.create(**request)  # type: ignore[arg-type]
    assert caught.value.status_code == status
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == param and message in error["message"]


def test_each_request_is_metered_once_with_its_tokens(
    server: LiveServer, tenant: tuple[str, str]
) -> None:
    with server.http(tenant[1]) as http:
        response = http.post(
            "/v1/embeddings", json={"model": MODEL_NAME, "input": ["hello world", "hi"]}
        )
    assert response.status_code == 200
    row = server.ledger_row(response.headers["x-request-id"])
    assert (row["endpoint"], row["model"], row["status"]) == ("embeddings", MODEL_NAME, "ok")
    assert (row["tenant_id"], row["prompt_tokens"], row["completion_tokens"]) == (tenant[0], 7, 0)


def test_embedding_work_runs_where_the_engine_wants_it(
    engine_backend: EngineBackend, tiny_backend: EngineBackend
) -> None:
    """Engine on a thread here: on that thread (one OpenMP team, see AsyncEngine). Engine in
    its own process: on one worker thread here, with one torch thread. No engine: a thread."""

    def where() -> tuple[str, int]:
        return threading.current_thread().name, torch.get_num_threads()

    def run(*backends: EngineBackend) -> tuple[str, int]:
        services = SimpleNamespace(models=SimpleNamespace(backends=list(backends)))
        return asyncio.run(run_compute(services, where))  # type: ignore[arg-type]

    assert run(tiny_backend)[0] == "talkloop-engine"
    assert run(engine_backend)[0].startswith("talkloop-torch")
    assert run(engine_backend)[1] == 1
    assert not run()[0].startswith(("talkloop-engine", "talkloop-torch"))
