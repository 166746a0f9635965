"""The chat page: `GET /` serves it, `GET /static/{name}` its script and stylesheet, read from the installed package.

The page talks only to this server's own API (`/v1/models`, `/v1/chat/completions`), so it needs no
API key itself; it asks the user for one when the API answers 401.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from starlette.responses import Response

from chat_cli.server.errors import APIError

PAGE = "index.html"
_MEDIA_TYPES = {
    PAGE: "text/html; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "chat.css": "text/css; charset=utf-8",
}
# Only the page's own script and stylesheet run, and it talks only to this server: even a bug in its
# Markdown renderer could not run a script or load an image that a model wrote.
_CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
_HEADERS = {
    "Content-Security-Policy": _CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidated, so an upgraded package serves its new page at once
}


def add_page_routes(app: FastAPI) -> None:
    app.add_api_route("/", _page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/static/{name}", _static_file, methods=["GET"], include_in_schema=False)


async def _page() -> Response:
    return _file_response(PAGE)


async def _static_file(name: str) -> Response:
    if name not in _MEDIA_TYPES or name == PAGE:
        raise APIError(404, f"no static file {name!r}; the chat page has {', '.join(sorted(set(_MEDIA_TYPES) - {PAGE}))}")
    return _file_response(name)


def _file_response(name: str) -> Response:
    content = resources.files("chat_cli").joinpath("static", name).read_bytes()
    return Response(content, media_type=_MEDIA_TYPES[name], headers=_HEADERS)
