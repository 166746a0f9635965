"""Reading a request body: at most `--max-body-bytes`, then parsed into its pydantic model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from chat_cli.server.errors import APIError, bad_request, from_validation_error
from chat_cli.server.request_group import ClientDisconnected

M = TypeVar("M", bound=BaseModel)

_READ = "chat_cli.body_read"  # set in the ASGI scope once the whole body has been received
# A body up to this many times the limit is read (and dropped) before its 413 is sent: see drain_unread_body.
_DRAIN_FACTOR = 4


async def read_request(request: Request, model: type[M], max_bytes: int) -> M:
    body = await read_body(request, max_bytes)
    if not body.strip():
        raise bad_request("the request body is empty: expected a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to be too large (before reading it when declared)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    body = bytearray()
    try:
        async for chunk in _chunks(request):
            body += chunk
            if len(body) > max_bytes:
                raise _too_large(None, max_bytes)
    except ClientDisconnect:
        raise ClientDisconnected() from None  # it left while sending: nobody to answer
    return bytes(body)


async def drain_unread_body(request: Request, max_bytes: int) -> None:
    """Read and drop what is left of a body no handler read (up to a few times `max_bytes`) before an error answers it.

    Closing a connection with unread data in it makes the kernel reset it, and the client then sees a
    reset instead of the answer (a 401 for a large body sent with a wrong key, a 413); a request read to
    its end also leaves its connection open for the next one.
    """
    if request.scope.get(_READ) or request.scope.get("type") != "http":
        return
    received = 0
    try:
        async for chunk in _chunks(request):
            received += len(chunk)
            if received > _DRAIN_FACTOR * max_bytes:
                return
    except ClientDisconnect:
        return


async def _chunks(request: Request) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive; the scope records when the last one came, so nothing waits for more."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        if not message.get("more_body", False):
            request.scope[_READ] = True
            yield message.get("body", b"")
            return
        yield message.get("body", b"")


def _too_large(size: int | None, max_bytes: int) -> APIError:
    got = f"{size} bytes" if size is not None else "more than that"
    return APIError(
        413,
        f"the request body is too large: this server takes at most {max_bytes} bytes (--max-body-bytes); got {got}",
        code="request_too_large",
    )
