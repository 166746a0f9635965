"""`AsyncEngine`: many concurrent requests on one Engine, for servers and notebooks.

One thread owns the Generator and runs steps while there is work; it sleeps when there is none.
Callers submit requests and cancel them from any thread or event loop; each request's outputs come
back on its own asyncio queue. Requests join the running batch at the next step and leave it when
they finish or are cancelled (their cache is freed at once).

By default that thread is a background thread. A program that can give it the main thread should
(`start_thread=False`, then `run_forever()`): on CPU, PyTorch's OpenMP workers run a decode step
about a third slower when the thread that drives them is not the one that loaded the model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from chat_core.engine.engine import DeltaCursor, Engine, PromptInput, StreamDelta
from chat_core.outputs import RequestOutput
from chat_core.sampling_params import SamplingParams


class EngineOverloadedError(RuntimeError):
    """Too many requests are waiting; try again later."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineDeadError(RuntimeError):
    """The engine failed and cannot recover (e.g. a worker process died); it takes no more requests."""


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    steps: int
    scheduled_sequences: int
    max_sequences_in_step: int
    preemptions: int
    generation_tokens: int
    prompt_tokens: int
    healthy: bool
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found there (not computed again)
    prefix_cache_evictions: int = 0  # cached blocks given to other tokens

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@dataclass
class _Pending:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    accepted: concurrent.futures.Future[None]
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[RequestOutput | BaseException]
    num_tokens_seen: int = 0


class AsyncEngine:
    def __init__(self, engine: Engine, *, max_waiting_requests: int = 256, start_thread: bool = True) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Pending] = {}
        self._request_ids = itertools.count()
        self._dead: BaseException | None = None
        self._closed = False
        self._shut_down = False
        self._generation_tokens = 0
        self._prompt_tokens = 0
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(target=self._run, name="chat-engine-loop", daemon=True)
            self._thread.start()

    @classmethod
    def from_pretrained(cls, model: str | None = None, **kwargs: Any) -> AsyncEngine:
        max_waiting = kwargs.pop("max_waiting_requests", 256)
        start_thread = kwargs.pop("start_thread", True)
        engine = Engine.from_pretrained(model, **kwargs) if model is not None else Engine.from_pretrained(**kwargs)
        return cls(engine, max_waiting_requests=max_waiting, start_thread=start_thread)

    # Front: called from event loops
    async def generate(
        self, prompt: PromptInput, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its state after every step it advanced in; the last one is finished.

        Leaving the iteration early (break, cancellation, a closed connection) aborts the request.
        """
        stream = await self.submit(prompt, params, request_id)
        finished = False
        try:
            while True:
                item = await stream.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(stream.request_id)

    async def stream(
        self, prompt: PromptInput, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[StreamDelta]:
        """Yield what each step added to a single completion (leaving early cancels it)."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"stream() streams one completion; got n={params.n} (use generate())")
        cursor = DeltaCursor()
        outputs = self.generate(prompt, params, request_id)
        try:
            async for output in outputs:
                yield cursor.advance(output.outputs[0])
        finally:
            await outputs.aclose()

    async def submit(self, prompt: PromptInput, params: SamplingParams | None = None, request_id: str | None = None) -> _Pending:
        """Queue a request; raises at once if it is invalid, the engine is overloaded, or it is dead."""
        self._check_alive()
        text, token_ids = self.engine.encode_prompt(prompt)
        request_id = request_id if request_id is not None else f"areq-{next(self._request_ids)}"
        pending = _Pending(
            request_id,
            text,
            token_ids,
            params or SamplingParams(),
            concurrent.futures.Future(),
            asyncio.get_running_loop(),
            asyncio.Queue(),
        )
        self._commands.put(("add", pending))
        self._wakeup.set()
        try:
            await asyncio.wrap_future(pending.accepted)
        except asyncio.CancelledError:
            # The caller left while the request was queued. If the engine took it before the
            # cancellation reached it, nobody will read its outputs: abort it.
            self.abort(request_id)
            raise
        return pending

    def abort(self, request_id: str) -> None:
        """Cancel a request from any thread; its cache is freed at the engine's next turn."""
        self._commands.put(("abort", request_id))
        self._wakeup.set()

    def stats(self) -> EngineStats:
        scheduler = self.engine.generator.scheduler
        prefix_cache = self.engine.prefix_cache_stats
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            steps=scheduler.stats.steps,
            scheduled_sequences=scheduler.stats.scheduled_sequences,
            max_sequences_in_step=scheduler.stats.max_sequences_in_step,
            preemptions=scheduler.stats.preemptions,
            generation_tokens=self._generation_tokens,
            prompt_tokens=self._prompt_tokens,
            healthy=self._dead is None,
            prefix_cache_queries=prefix_cache.queries,
            prefix_cache_hits=prefix_cache.hits,
            prefix_cache_evictions=prefix_cache.evictions,
        )

    @property
    def healthy(self) -> bool:
        return self._dead is None and not self._closed

    def _check_alive(self) -> None:
        if self._closed:
            raise EngineDeadError("the engine has been shut down")
        if self._dead is not None:
            raise EngineDeadError(f"the engine failed and cannot recover: {self._dead}")

    def run_forever(self) -> None:
        """Run the engine loop on the calling thread until `stop()` or `shutdown()` (with `start_thread=False`)."""
        if self._thread is not None:
            raise RuntimeError("this AsyncEngine already runs its loop on a background thread")
        self._run()

    def stop(self) -> None:
        """Ask the loop to end (from any thread): requests in flight fail with EngineDeadError."""
        self._closed = True
        self._commands.put(("stop", None))
        self._wakeup.set()

    def shutdown(self) -> None:
        """Stop the loop, wait for a background loop to end, and shut the engine down."""
        if self._shut_down:
            return
        self._shut_down = True
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.engine.shutdown()

    # Back: the engine thread
    def _run(self) -> None:
        generator = self.engine.generator
        while True:
            if not self._drain_commands():
                return
            if not generator.has_unfinished_requests():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = generator.step()
            except Exception as exc:  # a failed step: fail its requests, then see whether the engine survived
                self._fail_all(exc)
                try:
                    self.engine.executor.check_health()
                except Exception as fatal:
                    self._dead = fatal
                continue
            for output in outputs:
                self._deliver(output)

    def _drain_commands(self) -> bool:
        generator = self.engine.generator
        while True:
            try:
                command, value = self._commands.get_nowait()
            except queue.Empty:
                return True
            if command == "stop":
                self._fail_all(EngineDeadError("the engine is shutting down"))
                return False
            if command == "abort":
                generator.abort_request(value)
                pending = self._streams.pop(value, None)
                if pending is not None:
                    _send(pending, asyncio.CancelledError())
                continue
            pending: _Pending = value
            if not pending.accepted.set_running_or_notify_cancel():
                continue  # its caller stopped waiting before the engine got to it (a client disconnected)
            try:
                self._check_alive()
                if len(generator.scheduler.waiting) >= self.max_waiting_requests:
                    raise EngineOverloadedError(f"the queue is full: {self.max_waiting_requests} waiting request(s)")
                generator.add_request(pending.request_id, pending.prompt_token_ids, pending.params, pending.prompt)
            except Exception as exc:
                pending.accepted.set_exception(exc)
                continue
            self._streams[pending.request_id] = pending
            self._prompt_tokens += len(pending.prompt_token_ids)
            pending.accepted.set_result(None)

    def _deliver(self, output: RequestOutput) -> None:
        pending = self._streams.get(output.request_id)
        if pending is None:
            return
        num_tokens = output.num_completion_tokens
        self._generation_tokens += num_tokens - pending.num_tokens_seen
        pending.num_tokens_seen = num_tokens
        if output.finished:
            del self._streams[output.request_id]
        if not _send(pending, output):
            self._streams.pop(output.request_id, None)
            self.engine.generator.abort_request(output.request_id)  # nobody is listening any more

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, pending in list(self._streams.items()):
            self.engine.generator.abort_request(request_id)
            _send(pending, exc)
        self._streams.clear()



def _send(pending: _Pending, item: RequestOutput | BaseException) -> bool:
    """Hand an item to the request's event loop; False if that loop has closed."""
    try:
        pending.loop.call_soon_threadsafe(pending.outputs.put_nowait, item)
    except RuntimeError:  # "Event loop is closed": its caller is gone
        return False
    return True
