"""OpenAI-compatible API (`/v1`): models, chat completions, completions."""

from fastapi import APIRouter

router = APIRouter(prefix="/v1", tags=["openai"])

__all__ = ["router"]
