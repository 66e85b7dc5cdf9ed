"""The native API (`/api`): characters, world books, personas, conversations and their
messages (SSE replies), feedback, group rooms. One router module per resource; data goes through
`store.native.NativeStore`, scoped to the caller's tenant (and end-user where owned).
"""

from fastapi import APIRouter

from talkloop.server.errors import ERROR_RESPONSES
from talkloop.server.native_api import (
    characters,
    conversations,
    feedback,
    messages,
    personas,
    rooms,
    world_books,
)

router = APIRouter(prefix="/api", responses=ERROR_RESPONSES)
for module in (characters, world_books, personas, conversations, messages, feedback, rooms):
    router.include_router(module.router)

__all__ = ["router"]
