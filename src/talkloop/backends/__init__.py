"""Model backends: one interface in front of the built-in engine or a remote OpenAI server."""

from talkloop.backends.base import (
    BackendError,
    BackendOverloadedError,
    GenerationChunk,
    GenerationRequest,
    ModelBackend,
)

__all__ = [
    "BackendError",
    "BackendOverloadedError",
    "GenerationChunk",
    "GenerationRequest",
    "ModelBackend",
]
