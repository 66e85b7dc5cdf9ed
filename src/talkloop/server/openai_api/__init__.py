"""OpenAI-compatible API (`/v1`): models, chat completions, completions, embeddings.

Each endpoint is its own module with its own `router`; add one by including it below.
"""

from typing import Any

from fastapi import APIRouter

from talkloop.server.errors import ERROR_RESPONSES
from talkloop.server.openai_api import chat, completions, embeddings, models

# `stream: true` answers with server-sent events
STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}}
}
router = APIRouter(prefix="/v1", tags=["openai"], responses=ERROR_RESPONSES)
router.include_router(models.router)
router.include_router(chat.router, responses=STREAM_DOC)
router.include_router(completions.router, responses=STREAM_DOC)
router.include_router(embeddings.router)

__all__ = ["router"]
