"""Errors in OpenAI's format, `{"error": {"message", "type", "param", "code"}}`, with the right status.

Everything a handler can fail with is turned into an `APIError` here: validation errors, the
engine's refusals (invalid request, overload, dead engine) and anything unexpected.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from chat_cli.server.protocol import ErrorBody, ErrorResponse
from chat_core import PromptTooLongError
from chat_core.engine.async_engine import EngineDeadError, EngineOverloadedError

logger = logging.getLogger("chat_cli.server")

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error response: status, message, and OpenAI's `param` and `code`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        error_type = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return ErrorResponse(error=ErrorBody(message=self.message, type=error_type, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation_error(exc: ValidationError) -> APIError:
    """A 400 naming the first bad field, what it got and what was expected."""
    errors = exc.errors(include_url=False)
    if errors and errors[0]["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {errors[0]['ctx']['error']}", code="invalid_json")
    by_param: dict[str, list[dict[str, Any]]] = {}
    for error in errors:
        by_param.setdefault(_param_name(error["loc"]), []).append(error)
    # Within the first bad field, the deepest location is the most telling: a union's last member tried
    # ("content[0].type: expected 'text'") says more than its first ("content: expected a string").
    field = _param_name(errors[0]["loc"][:1])
    param = max((p for p in by_param if p == field or p.startswith((f"{field}[", f"{field}."))), key=len)
    group = by_param[param]
    if group[0]["type"] == "missing":
        return bad_request(f"'{param}' is required", param=param, code="missing_required_parameter")
    expectations = list(dict.fromkeys(_expectation(e["msg"]) for e in group))
    expected = " or ".join([expectations[0], *(e.removeprefix("expected ") for e in expectations[1:])])
    where = f"'{param}'" if param else "the request body"
    return bad_request(f"{where} is invalid: {expected}; got {_short_repr(group[0].get('input'))}", param=param or None)


def from_engine_error(exc: BaseException) -> APIError:
    """The response for an exception the engine raised for a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineOverloadedError):
        retry_after = str(max(1, math.ceil(exc.retry_after_s)))
        return APIError(
            429,
            f"the server is overloaded: {exc}; retry after {retry_after} s",
            code="engine_overloaded",
            headers={"Retry-After": retry_after},
        )
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_dead")
    if isinstance(exc, PromptTooLongError):
        return bad_request(str(exc), code="context_length_exceeded")
    if isinstance(exc, (ValueError, TypeError)):  # the engine refused the request itself (bad token ids, ...)
        return bad_request(str(exc))
    logger.error("request failed in the engine", exc_info=exc)
    return APIError(500, f"the engine failed while running this request: {type(exc).__name__}: {exc}", code="engine_error")


def install_error_handlers(
    app: FastAPI, on_error: Callable[[int], None], before_error: Callable[[Request], Awaitable[None]]
) -> None:
    """Every error response in OpenAI's format; `on_error(status)` is told of each (for metrics), and
    `before_error(request)` runs before it is sent (to read what is left of the request)."""

    async def respond(request: Request, error: APIError) -> JSONResponse:
        on_error(error.status)
        await before_error(request)
        return error.response()

    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return await respond(request, exc)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return await respond(request, APIError(exc.status_code, message, headers=exc.headers))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return await respond(request, from_engine_error(exc))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _param_name(loc: tuple[int | str, ...]) -> str:
    """`messages[0].content` from pydantic's location, without the union-member tags it adds."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool", "none"):
            continue  # e.g. ('stop', 'list[str]'): which member of the union was tried
        else:
            name += f".{part}" if name else part
    return name


def _expectation(message: str) -> str:
    """'expected a valid string' from pydantic's 'Input should be a valid string'."""
    if message.startswith("Value error, "):  # our own validators' messages, already phrased
        return message[len("Value error, ") :]
    if message.startswith("Input should be "):
        return "expected " + message[len("Input should be ") :]
    return message


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
