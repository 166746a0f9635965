"""What every handler reaches through `request.app.state.server`: the engine, the settings, the metrics."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from starlette.requests import Request

from chat_cli.server.errors import APIError
from chat_cli.server.metrics import ServerMetrics
from chat_cli.server.request_group import RequestGroup
from chat_cli.server.sampling import EnginePrompt
from chat_cli.server.settings import ServerSettings
from chat_core import Engine, SamplingParams
from chat_core.engine.async_engine import AsyncEngine


@dataclass
class ServerState:
    async_engine: AsyncEngine
    settings: ServerSettings
    metrics: ServerMetrics
    groups: set[RequestGroup] = field(default_factory=set)  # the requests in flight
    draining: bool = False  # shutting down: no new requests; those in flight may finish
    stopping: bool = False  # the requests still in flight are being ended

    @property
    def engine(self) -> Engine:
        return self.async_engine.engine

    def new_group(self, prompts: list[EnginePrompt], params: SamplingParams, request_id: str) -> RequestGroup:
        if self.draining or self.stopping:
            raise shutting_down()
        return RequestGroup(self.async_engine, self.metrics, prompts, params, request_id, self.groups)

    def start_draining(self) -> None:
        """Take no new requests (503 with Retry-After; /health too); those in flight go on."""
        self.draining = True

    def stop_requests(self) -> None:
        """End every request in flight with a 503 (streams get it as their last event) and take no more."""
        self.draining = self.stopping = True
        for group in list(self.groups):
            group.fail(shutting_down())


SHUTDOWN_RETRY_AFTER_S = 1  # another replica (or this one restarted) can take the request at once


def shutting_down() -> APIError:
    return APIError(
        503,
        "the server is shutting down; retry on another one",
        code="server_shutting_down",
        headers={"Retry-After": str(SHUTDOWN_RETRY_AFTER_S)},
    )


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def new_response_id(prefix: str) -> tuple[str, int]:
    """A response id (also the engine requests' id prefix) and its creation time."""
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())
