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
    stopping: bool = False

    @property
    def engine(self) -> Engine:
        return self.async_engine.engine

    def new_group(self, prompts: list[EnginePrompt], params: SamplingParams, request_id: str) -> RequestGroup:
        if self.stopping:
            raise _shutting_down()
        return RequestGroup(self.async_engine, self.metrics, prompts, params, request_id, self.groups)

    def stop_requests(self) -> None:
        """End every request in flight with a 503 (streams get it as their last event) and take no more."""
        self.stopping = True
        for group in list(self.groups):
            group.fail(_shutting_down())


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry on another one", code="server_shutting_down")


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def new_response_id(prefix: str) -> tuple[str, int]:
    """A response id (also the engine requests' id prefix) and its creation time."""
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())
