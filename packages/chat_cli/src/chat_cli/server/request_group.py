"""The engine requests behind one HTTP request (one per prompt, each with n completions), run together.

One reader task per prompt forwards the engine's cumulative outputs to a queue that `start`,
`results` and `updates` read from; `fail` puts an error in that queue (the server is stopping).
Every way out closes the engine's streams, and closing a stream early aborts its request, so its
sequences leave the batch and free their cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from starlette.requests import Request

from chat_cli.server.errors import APIError, from_engine_error
from chat_cli.server.metrics import ServerMetrics
from chat_cli.server.sampling import EnginePrompt
from chat_core import RequestOutput, SamplingParams
from chat_core.engine.async_engine import AsyncEngine

T = TypeVar("T")

_DONE = object()


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


class RequestGroup:
    def __init__(
        self,
        async_engine: AsyncEngine,
        metrics: ServerMetrics,
        prompts: list[EnginePrompt],
        params: SamplingParams,
        request_id: str,
        registry: set[RequestGroup],
    ) -> None:
        arrival = time.perf_counter()
        self.prompts = prompts
        self._streams = [
            metrics.track(async_engine.generate(prompt, params, request_id=f"{request_id}-{index}"), arrival)
            for index, prompt in enumerate(prompts)
        ]
        self._queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        self._readers: list[asyncio.Task[None]] = []
        self._latest: dict[int, RequestOutput] = {}
        self._running = len(prompts)
        self._last_index = 0
        self._registry = registry
        registry.add(self)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p["prompt_token_ids"]) for p in self.prompts)

    async def start(self) -> list[RequestOutput]:
        """Wait until every prompt was accepted and produced output, so refusals still get a status code."""
        while len(self._latest) < len(self._streams) and await self._advance():
            pass
        return [self._latest[i] for i in range(len(self._streams))]

    async def results(self) -> list[RequestOutput]:
        """The final output of every prompt, in order."""
        while await self._advance():
            pass
        await self.aclose()
        return [self._latest[i] for i in range(len(self._streams))]

    async def updates(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, its latest output): those `start` saw, then each new one; raises APIError if one fails."""
        for index, output in sorted(self._latest.items()):
            yield index, output
        while await self._advance():
            yield self._last_index, self._latest[self._last_index]

    def fail(self, error: APIError) -> None:
        """End the group with `error`, from outside (e.g. the server is stopping)."""
        self._queue.put_nowait((-1, error))

    async def aclose(self) -> None:
        self._registry.discard(self)
        for reader in self._readers:
            reader.cancel()
        for reader in self._readers:
            with contextlib.suppress(BaseException):
                await reader
        for stream in self._streams:
            with contextlib.suppress(BaseException):
                await stream.aclose()

    async def _advance(self) -> bool:
        """Take the next output into `_latest` (False once every prompt finished); raises what failed."""
        if not self._readers:
            self._readers = [asyncio.create_task(self._forward(i, s)) for i, s in enumerate(self._streams)]
        while self._running:
            try:
                index, item = await self._queue.get()
            except BaseException:
                await self.aclose()
                raise
            if item is _DONE:
                self._running -= 1
                continue
            if isinstance(item, BaseException):
                await self.aclose()
                raise _as_api_error(item)
            self._latest[index] = item  # type: ignore[assignment]
            self._last_index = index
            return True
        return False

    async def _forward(self, index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                self._queue.put_nowait((index, output))
            self._queue.put_nowait((index, _DONE))
        except asyncio.CancelledError as exc:
            if asyncio.current_task().cancelling():  # this reader is being stopped
                raise
            self._queue.put_nowait((index, exc))  # the engine aborted the request itself
        except BaseException as exc:
            self._queue.put_nowait((index, exc))


async def run_until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, or cancel it and raise ClientDisconnected if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _as_api_error(exc: BaseException) -> BaseException:
    if isinstance(exc, (ClientDisconnected, APIError)):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return APIError(503, "the request was aborted by the engine", code="request_aborted")
    return from_engine_error(exc)
