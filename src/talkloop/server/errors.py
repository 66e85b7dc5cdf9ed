"""The server's error hierarchy, mapped once onto the OpenAI error envelope.

`{"error": {"message", "type", "param", "code"}}` with the HTTP status of the error class;
engine and backend errors, FastAPI validation (400, not 422) and unknown routes map here too.
`Retry-After` accompanies 429 and 503; `x-should-retry: false` marks errors a retry cannot fix.
`ERROR_RESPONSES` documents the envelope on the API routers; `install_error_handlers` also drops
FastAPI's 422 from the OpenAPI document, since validation errors are sent as 400.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from talkloop.backends.base import BackendError, BackendOverloadedError
from talkloop.engine.errors import InvalidRequestError

logger = logging.getLogger(__name__)


class ServerError(Exception):
    """Base of every error the server raises on purpose."""

    status_code = 500
    error_type = "server_error"
    default_code: str | None = None
    should_retry: bool | None = None  # None: leave it to the client's own policy

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def headers(self) -> dict[str, str]:
        if self.should_retry is None:
            return {}
        return {"x-should-retry": "true" if self.should_retry else "false"}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


class BadRequestError(ServerError):
    status_code = 400
    error_type = "invalid_request_error"
    should_retry = False


class AuthenticationError(ServerError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"
    should_retry = False


class PermissionDeniedError(ServerError):
    status_code = 403
    error_type = "invalid_request_error"
    default_code = "permission_denied"
    should_retry = False


class NotFoundError(ServerError):
    """Absent, or owned by another tenant: the two are indistinguishable on purpose."""

    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"
    should_retry = False


class ConflictError(ServerError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"
    should_retry = False


class RetryableError(ServerError):
    """An error that clears with time; `Retry-After` says when to try again."""

    should_retry = True

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class RateLimitedError(RetryableError):
    status_code = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"


class QuotaExceededError(ServerError):
    """429 that waiting does not fix (the quota must be raised): no retry."""

    status_code = 429
    error_type = "insufficient_quota"
    default_code = "insufficient_quota"
    should_retry = False


class OverloadedError(RetryableError):
    status_code = 503
    error_type = "server_error"
    default_code = "overloaded"


class ShuttingDownError(RetryableError):
    status_code = 503
    error_type = "server_error"
    default_code = "shutting_down"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    """The body of every error response (OpenAI's shape)."""

    error: ErrorDetail


ERROR_STATUSES = {
    400: "Invalid request: bad JSON, a field out of range, an unsupported option",
    401: "Missing, malformed, unknown or revoked API key",
    403: "The key may not do this (admin only), or its tenant is disabled",
    404: "No such resource, or it belongs to another tenant",
    409: "The request conflicts with the resource's current state",
    429: "Rate limited (retry after `Retry-After`) or out of quota (no retry)",
    500: "Internal or model backend error",
    503: "Overloaded or shutting down (retry after `Retry-After`)",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": description}
    for status, description in ERROR_STATUSES.items()
}
VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def as_server_error(exc: BaseException) -> ServerError:
    """The `ServerError` an exception from any layer maps to."""
    if isinstance(exc, ServerError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return BadRequestError(str(exc), param=exc.param)
    if isinstance(exc, BackendOverloadedError):
        return OverloadedError(str(exc), retry_after_s=exc.retry_after_s)
    if isinstance(exc, BackendError):
        return ServerError(f"the model backend failed: {exc}", code="backend_error")
    logger.error("unhandled error", exc_info=exc)
    return ServerError("internal server error", code="internal_error")


def error_response(error: ServerError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers())


def validation_error(exc: RequestValidationError) -> BadRequestError:
    """FastAPI's 422 as OpenAI's 400, naming the first bad field as a JSON path."""
    first = exc.errors()[0]
    loc = [part for part in first.get("loc", ()) if part not in ("body", "query", "header")]
    if first.get("type") == "json_invalid":
        return BadRequestError("the request body is not valid JSON", code="invalid_json")
    param = _json_path(loc)
    if not param:
        return BadRequestError(f"invalid request body: {first.get('msg')}")
    return BadRequestError(f"invalid value for '{param}': {first.get('msg')}", param=param)


def _json_path(loc: list[Any]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith(("function-", "tagged-union")):
            path = f"{path}.{part}" if path else str(part)
    return path


def _http_error(exc: StarletteHTTPException) -> ServerError:
    error_types = {401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError}
    cls = error_types.get(exc.status_code)
    if cls is not None:
        return cls(str(exc.detail))
    error = ServerError(str(exc.detail))
    error.status_code = exc.status_code
    error.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error


def install_error_handlers(app: FastAPI) -> None:
    """Route every error the app can raise through `error_response`; the OpenAPI document
    then shows validation errors as the 400 they are sent as, not FastAPI's 422."""

    for exc_type in (
        RequestValidationError,
        StarletteHTTPException,
        ServerError,
        InvalidRequestError,
        BackendError,
        Exception,
    ):
        app.add_exception_handler(exc_type, _handle)
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        document = build_openapi()  # built once, then cached on the app
        _drop_validation_responses(document)  # idempotent
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _drop_validation_responses(document: dict[str, Any]) -> None:
    """Removes FastAPI's 422 responses (and their schemas) from `document`, in place."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    for name in VALIDATION_SCHEMAS:
        schemas.pop(name, None)


async def _handle(_request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, RequestValidationError):
        return error_response(validation_error(exc))
    if isinstance(exc, StarletteHTTPException):
        return error_response(_http_error(exc))
    return error_response(as_server_error(exc))
