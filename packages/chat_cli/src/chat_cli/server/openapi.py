"""/openapi.json with what FastAPI cannot see: the routes read their own bodies (to bound their size first), so
their request and response bodies, this server's limits, its error responses and its API key are added here.

Clients and API fuzzers (tests/soak/fuzz_api.py) generate requests from it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from chat_cli.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
)
from chat_cli.server.settings import ServerSettings

_REQUESTS: list[type[BaseModel]] = [ChatCompletionRequest, CompletionRequest]
_RESPONSES: list[type[BaseModel]] = [ChatCompletionResponse, ChatCompletionChunk, CompletionResponse, ModelList, ErrorResponse]
_BODIES = {  # path -> its request and response components
    "/v1/chat/completions": ("ChatCompletionRequest", "ChatCompletionResponse"),
    "/v1/completions": ("CompletionRequest", "CompletionResponse"),
}


# One server-sent event (OpenAPI before 3.2 describes each event): a chunk in JSON, an error, or [DONE] last.
_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a chunk or an error as JSON, or [DONE] at the end"}},
}


def install_openapi(app: FastAPI, settings: ServerSettings, max_model_len: int) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _build(app, settings, max_model_len)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _build(app: FastAPI, settings: ServerSettings, max_model_len: int) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    _, definitions = models_json_schema(
        [(model, "validation") for model in _REQUESTS] + [(model, "serialization") for model in _RESPONSES],
        ref_template="#/components/schemas/{model}",
    )
    components = definitions["$defs"]
    _add_limits(components, settings, max_model_len)
    schema.setdefault("components", {})["schemas"] = components
    errors = {
        "4XX": _json("the request was refused", "ErrorResponse"),
        "5XX": _json("the server or engine failed, is shutting down, or its engine is dead", "ErrorResponse"),
    }
    for path, (request, response) in _BODIES.items():
        operation = schema["paths"][path]["post"]
        operation["requestBody"] = {"required": True, **_json("", request)}
        del operation["requestBody"]["description"]
        ok = _json("the answer whole, or streamed as server-sent events (`stream`: true)", response)
        ok["content"]["text/event-stream"] = {"schema": _EVENT}
        operation["responses"] = {"200": ok, **errors}
    schema["paths"]["/v1/models"]["get"]["responses"] = {"200": _json("the served model", "ModelList"), **errors}
    counts = {"sequences_running": {"type": "integer"}, "sequences_waiting": {"type": "integer"}}
    health = {"type": "object", "properties": {"status": {"const": "ok"}, **counts}}
    schema["paths"]["/health"]["get"]["responses"] = {
        "200": {"description": "the engine takes requests", "content": {"application/json": {"schema": health}}},
        "503": _json("the engine is dead, or the server is shutting down", "ErrorResponse"),
    }
    schema["paths"]["/metrics"]["get"]["responses"] = {
        "200": {"description": "Prometheus metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}
    }
    if settings.api_key is not None:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, item in schema["paths"].items():
            if path.startswith("/v1/"):
                for operation in item.values():
                    operation["security"] = [{"bearer": []}]
    return schema


def _json(description: str, component: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{component}"}}}}


def _add_limits(components: dict[str, Any], settings: ServerSettings, max_model_len: int) -> None:
    """This server's limits, so that a request the schema allows is one the server can take (the prompt's own length
    aside: a prompt and max_tokens must fit in the context together)."""
    max_tokens = min(settings.max_tokens_limit or max_model_len - 1, max_model_len - 1)
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        properties = components[name]["properties"]
        properties["model"] = {"anyOf": [{"const": settings.served_model_name}, {"type": "null"}], "default": None}
        _set(properties["n"], maximum=settings.max_n)
        text = {"type": "string", "minLength": 1}
        properties["stop"] = {"anyOf": [text, {"type": "array", "items": text}, {"type": "null"}], "default": None}
        for field in ("max_tokens", "max_completion_tokens"):
            if field in properties:
                _set(properties[field], maximum=max_tokens)
    components["ChatCompletionRequest"]["properties"]["messages"]["maxItems"] = settings.max_messages
    token_ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
    components["CompletionRequest"]["properties"]["prompt"] = {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": settings.max_prompts},
            token_ids,
            {"type": "array", "items": token_ids, "minItems": 1, "maxItems": settings.max_prompts},
        ]
    }
    components["CompletionRequest"]["required"] = ["prompt"]


def _set(schema: dict[str, Any], **constraints: Any) -> None:
    """Constrain the integer member of a property (itself, or the one in its anyOf)."""
    for member in [schema, *schema.get("anyOf", [])]:
        if member.get("type") == "integer":
            member.update(constraints)
