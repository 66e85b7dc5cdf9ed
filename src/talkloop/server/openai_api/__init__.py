"""OpenAI-compatible API (`/v1`): models, chat completions, completions, embeddings.

Each endpoint is its own module with its own `router`; add one by including it below.
"""

from fastapi import APIRouter

from talkloop.server.openai_api import chat, completions, embeddings, models

router = APIRouter(prefix="/v1", tags=["openai"])
router.include_router(models.router)
router.include_router(chat.router)
router.include_router(completions.router)
router.include_router(embeddings.router)

__all__ = ["router"]
