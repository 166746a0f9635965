"""CORS for the origins given with --allowed-origins (none by default: then this middleware is not installed)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp

from chat_cli.server.errors import APIError


class CORS(CORSMiddleware):
    """Starlette's CORS, with refused preflights answered in OpenAI's error format like every other error."""

    def __init__(self, app: ASGIApp, allowed_origins: tuple[str, ...]) -> None:
        super().__init__(
            app,
            allow_origins=list(allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After"],
        )

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        reason = bytes(response.body).decode()  # e.g. "Disallowed CORS origin, headers"
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        error = APIError(response.status_code, f"CORS preflight refused: {reason.removeprefix('Disallowed CORS ')} not allowed")
        refused = error.response()
        refused.headers.update(headers)
        return refused
