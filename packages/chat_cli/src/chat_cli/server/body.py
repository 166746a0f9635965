"""Reading a request body: at most `--max-body-bytes`, then parsed into its pydantic model."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from chat_cli.server.errors import APIError, bad_request, from_validation_error

M = TypeVar("M", bound=BaseModel)


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
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(None, max_bytes)
    return bytes(body)


def _too_large(size: int | None, max_bytes: int) -> APIError:
    got = f"{size} bytes" if size is not None else "more than that"
    return APIError(
        413,
        f"the request body is too large: this server takes at most {max_bytes} bytes (--max-body-bytes); got {got}",
        code="request_too_large",
    )
