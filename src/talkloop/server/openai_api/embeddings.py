"""`POST /v1/embeddings`: the bundled all-MiniLM-L6-v2 (384 dimensions), as OpenAI shapes it.

`input` is a string, a list of strings, a list of token ids or a list of such lists (ids of
the MiniLM vocabulary); `encoding_format` is `float` or `base64` (little-endian float32, which
the `openai` SDK asks for by default). The model loads on the first request and is metered like
a generation (prompt tokens, [CLS] and [SEP] included; no completion tokens).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
from fastapi import APIRouter, FastAPI, Request
from pydantic import Field

from talkloop.backends.base import GenerationRequest, Usage
from talkloop.backends.engine_backend import EngineBackend
from talkloop.engine.embeddings import MODEL_NAME, Embedder
from talkloop.engine.sampling_params import SamplingParams
from talkloop.server.auth import Principal, PrincipalDep
from talkloop.server.db.models import UsageStatus
from talkloop.server.deps import ServicesDep
from talkloop.server.errors import BadRequestError, NotFoundError
from talkloop.server.ledger import Meter
from talkloop.server.openai_api.schemas import Lenient
from talkloop.server.services import Services

T = TypeVar("T")
router = APIRouter()
ENDPOINT = "embeddings"
MAX_INPUTS = 2048  # OpenAI's limit per request
MODEL_ALIASES = frozenset({MODEL_NAME.lower(), f"sentence-transformers/{MODEL_NAME}".lower()})


class EmbeddingRequest(Lenient):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


async def run_compute(services: Services, fn: Callable[[], T]) -> T:
    """Torch work off the event loop: where the built-in engine, if any, wants it (`run_torch`)."""
    for backend in services.models.backends:
        if isinstance(backend, EngineBackend):
            return await backend.run_torch(fn)
    return await asyncio.to_thread(fn)


class EmbedderSlot:
    """The app's embedder, loaded once on first use (off the event loop)."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.embedder: Embedder | None = None

    async def get(self, services: Services) -> Embedder:
        async with self.lock:
            if self.embedder is None:
                self.embedder = await run_compute(services, Embedder.load)
            return self.embedder


def embedder_slot(app: FastAPI) -> EmbedderSlot:
    slot: EmbedderSlot | None = getattr(app.state, "embedder_slot", None)
    if slot is None:  # NOTE: no await since the lookup, so no other request races this
        slot = app.state.embedder_slot = EmbedderSlot()
    return slot


def check_request(body: EmbeddingRequest) -> None:
    if body.model.lower() not in MODEL_ALIASES:
        raise NotFoundError(
            f"the embedding model {body.model!r} does not exist; available: [{MODEL_NAME!r}]",
            param="model",
            code="model_not_found",
        )
    if body.dimensions is not None and body.dimensions != 384:
        raise BadRequestError(
            f"dimensions must be 384 for {MODEL_NAME} (it cannot be shortened), "
            f"got {body.dimensions}",
            param="dimensions",
        )


def token_lists(body: EmbeddingRequest, embedder: Embedder) -> list[list[int]]:
    """Each input as the model's token ids, [CLS] and [SEP] included."""
    raw = body.input
    if isinstance(raw, str):
        return embedder.tokenize([raw])
    if not raw:
        raise BadRequestError("input must not be empty", param="input")
    if isinstance(raw[0], int):
        return [embedder.wrap_ids(raw)]  # one input given as token ids
    if len(raw) > MAX_INPUTS:
        raise BadRequestError(
            f"input allows at most {MAX_INPUTS} items per request, got {len(raw)}", param="input"
        )
    if isinstance(raw[0], str):
        return embedder.tokenize(raw)
    return [embedder.wrap_ids(ids, f"input[{i}]") for i, ids in enumerate(raw)]


def encode_vector(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        data = vector.to(torch.float32).numpy().astype("<f4").tobytes()
        return base64.b64encode(data).decode("ascii")
    values: list[float] = vector.tolist()
    return values


def meter_for(services: Services, request_id: str, principal: Principal) -> Meter:
    return Meter.start(services.ledger, principal, request_id, model=MODEL_NAME, endpoint=ENDPOINT)


@router.post("/embeddings")
async def create_embeddings(
    body: EmbeddingRequest, request: Request, principal: PrincipalDep, services: ServicesDep
) -> dict[str, Any]:
    check_request(body)
    embedder = await embedder_slot(request.app).get(services)
    batch_ids = token_lists(body, embedder)
    num_tokens = sum(len(ids) for ids in batch_ids)
    request_id = request.state.request_id
    meter = meter_for(services, request_id, principal.acting_for(body.user))
    flat_ids = [token_id for ids in batch_ids for token_id in ids]
    status = UsageStatus.REJECTED
    try:  # rate limits and quotas count the input tokens (and one for max_tokens)
        await meter.admit(
            GenerationRequest(request_id, SamplingParams(max_tokens=1), prompt=flat_ids)
        )
        status = UsageStatus.ERROR
        vectors = await run_compute(services, lambda: embedder.encode_ids(batch_ids))  # [N, 384]
        status = UsageStatus.OK
    except asyncio.CancelledError:
        status = UsageStatus.CLIENT_DISCONNECTED
        raise
    finally:
        meter.usage = Usage(num_tokens if status is UsageStatus.OK else 0, 0, 0)
        meter.finish(status)
    data = [
        {"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    usage = {"prompt_tokens": num_tokens, "total_tokens": num_tokens}
    return {"object": "list", "data": data, "model": MODEL_NAME, "usage": usage}
