"""Engine error hierarchy: every user-facing engine failure is an `EngineError`.

The server maps these once onto the OpenAI error envelope; messages name the field at fault.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request (prompt, sampling parameters) cannot be served as given."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[type[InvalidRequestError], tuple[str, str | None]]:
        return type(self), (str(self), self.param)  # `param` survives a trip between processes


class ModelLoadError(EngineError):
    """Weights, tokenizer or model metadata could not be read or are not supported."""


class UnsupportedModelError(ModelLoadError):
    """The architecture, quantization type or feature is not implemented."""


class EngineDeadError(EngineError):
    """The engine's step loop stopped after an unrecoverable error."""
