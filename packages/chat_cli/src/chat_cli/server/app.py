"""`build_app(async_engine, settings)`: the FastAPI application, its routes, authentication and error handling."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import APIRouter, Depends, FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chat_cli.server.body import drain_unread_body
from chat_cli.server.chat import create_chat_completion
from chat_cli.server.completions import create_completion
from chat_cli.server.cors import CORS
from chat_cli.server.errors import APIError, install_error_handlers
from chat_cli.server.metrics import ServerMetrics
from chat_cli.server.openapi import install_openapi
from chat_cli.server.page import add_page_routes
from chat_cli.server.protocol import ModelCard, ModelList
from chat_cli.server.request_group import ClientDisconnected
from chat_cli.server.settings import ServerSettings
from chat_cli.server.state import ServerState, server_state, shutting_down
from chat_core.engine.async_engine import AsyncEngine

_CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody reads it


def build_app(async_engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="chat-cli", summary="An OpenAI-compatible server for chat-core models.")
    metrics = ServerMetrics(async_engine)
    app.state.server = ServerState(async_engine, settings, metrics)
    install_error_handlers(
        app,
        on_error=lambda status: metrics.errors.labels(str(status)).inc(),
        before_error=lambda request: drain_unread_body(request, settings.max_body_bytes),
    )
    app.add_exception_handler(ClientDisconnected, _client_disconnected)

    api = APIRouter(prefix="/v1", dependencies=[Depends(_require_api_key)])
    api.add_api_route("/models", _list_models, methods=["GET"])
    api.add_api_route("/chat/completions", create_chat_completion, methods=["POST"])
    api.add_api_route("/completions", create_completion, methods=["POST"])
    app.include_router(api)
    app.add_api_route("/health", _health, methods=["GET"])
    app.add_api_route("/metrics", _metrics, methods=["GET"])
    add_page_routes(app)  # the chat page at /
    install_openapi(app, settings, async_engine.engine.max_model_len)
    if settings.allowed_origins:  # off by default: browsers on other sites cannot call this server
        app.add_middleware(CORS, allowed_origins=settings.allowed_origins)
    return app


async def _require_api_key(request: Request) -> None:
    expected = server_state(request).settings.api_key
    if expected is None:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise APIError(401, "no API key: send it as 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not _same_key(key.strip(), expected):
        raise APIError(401, "the API key is not valid for this server", code="invalid_api_key")


def _same_key(given: str, expected: str) -> bool:
    """Compared in constant time, as digests of one length, so neither the key nor its length can be guessed by timing."""
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())


async def _list_models(request: Request) -> JSONResponse:
    state = server_state(request)
    card = ModelCard(id=state.settings.served_model_name, max_model_len=state.engine.max_model_len)
    return JSONResponse(ModelList(data=[card]).model_dump(mode="json"))


async def _health(request: Request) -> Response:
    state = server_state(request)
    if not state.async_engine.healthy:
        raise APIError(503, "the engine is dead and takes no more requests; restart the server", code="engine_dead")
    if state.draining:  # load balancers stop sending requests here while the ones in flight finish
        raise shutting_down()
    stats = state.async_engine.stats()
    return JSONResponse({"status": "ok", "sequences_running": stats.num_running, "sequences_waiting": stats.num_waiting})


async def _metrics(request: Request) -> Response:
    metrics = server_state(request).metrics
    return Response(metrics.render(), media_type=metrics.content_type)


async def _client_disconnected(request: Request, exc: ClientDisconnected) -> Response:
    return Response(status_code=_CLIENT_CLOSED_REQUEST)
