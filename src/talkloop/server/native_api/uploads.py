"""Reading an uploaded file: `multipart/form-data` (the `file` field) or the raw body.

The multipart body is parsed with the standard library's `email` parser (no extra
dependency). The size is capped while reading, before anything is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import HTTP

from fastapi import Request

from talkloop.server.errors import BadRequestError

MAX_UPLOAD_BYTES = 64 << 20
FILE_FIELD = "file"


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str | None


async def read_body(request: Request, max_bytes: int = MAX_UPLOAD_BYTES) -> bytes:
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise BadRequestError(
                f"the upload is over the {max_bytes}-byte limit", code="upload_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload(request: Request) -> Upload:
    """The uploaded file: the `file` part of a multipart form, else the whole body."""
    content_type = request.headers.get("content-type", "")
    body = await read_body(request)
    if content_type.startswith("multipart/form-data"):
        return _file_part(content_type, body)
    if not body:
        raise BadRequestError("the upload is empty: send the file as the body or a form field")
    return Upload(body, request.query_params.get("filename"))


def _file_part(content_type: str, body: bytes) -> Upload:
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    form = message_from_bytes(head + body, policy=HTTP)
    if not isinstance(form, EmailMessage) or not form.is_multipart():
        raise BadRequestError("malformed multipart/form-data body", param=FILE_FIELD)
    for part in form.iter_parts():
        if part.get_param("name", header="content-disposition") == FILE_FIELD:
            data = part.get_payload(decode=True)
            if not isinstance(data, bytes) or not data:
                raise BadRequestError("the uploaded file is empty", param=FILE_FIELD)
            return Upload(data, part.get_filename())
    raise BadRequestError(f"no {FILE_FIELD!r} field in the form", param=FILE_FIELD)
