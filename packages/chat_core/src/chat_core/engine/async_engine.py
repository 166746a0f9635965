"""`AsyncEngine`: many concurrent requests on one Engine, for servers and notebooks.

Callers submit requests and cancel them from any thread or event loop; each request's outputs come
back on its own asyncio queue. Requests join the running batch at the next step and leave it when
they finish or are cancelled (their cache is freed at once).

One engine loop owns the Generator: it runs steps while there is work and waits when there is none.
`driver` says who runs it:
- "thread": a background thread (the default outside an event loop: scripts, tests).
- "event_loop": a task on the asyncio event loop that is running when the AsyncEngine is made (the
  default inside one: a Jupyter cell). It runs one step, then yields to the loop, so the code awaiting
  the outputs, the kernel and other tasks run between steps; between requests it only waits.
- "caller": `run_forever()` on a thread the program gives it (`chat-cli serve` gives it the main thread).
"event_loop" and "caller" step on the thread that loaded the model: a background thread was once
measured to slow PyTorch's CPU decode by about a third (benchmarks/bench_async_engine.py compares them).
Drive an Engine through one AsyncEngine at a time, and not directly while its loop may step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import queue
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Generator
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
    num_kv_blocks: int = 0  # KV cache blocks in all
    num_free_kv_blocks: int = 0  # of those, blocks no sequence holds (never used, or cached and evictable)

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


DRIVERS = ("auto", "thread", "event_loop", "caller")


class RequestStream(AsyncIterator[RequestOutput]):
    """One request's outputs: `async for` its state after every step it advanced in (the last one is
    finished), or `await` it for the final output. Leaving early (break, cancellation, `aclose()`)
    aborts the request."""

    def __init__(self, outputs: AsyncGenerator[RequestOutput, None]) -> None:
        self._outputs = outputs

    def __anext__(self) -> Awaitable[RequestOutput]:
        return self._outputs.__anext__()

    async def aclose(self) -> None:
        await self._outputs.aclose()

    def __await__(self) -> Generator[Any, None, RequestOutput]:
        return self._final().__await__()

    async def _final(self) -> RequestOutput:
        final: RequestOutput | None = None
        async with contextlib.aclosing(self._outputs):
            async for final in self._outputs:
                pass
        assert final is not None and final.finished, "a request's outputs end with its finished state"
        return final


class AsyncEngine:
    def __init__(
        self, engine: Engine, *, max_waiting_requests: int = 256, driver: str = "auto", start_thread: bool | None = None
    ) -> None:
        """`driver`: who runs the engine loop (see the module's docstring); "auto" is "event_loop" when an
        asyncio event loop is running in this thread, else "thread". `start_thread=True/False` is the older
        spelling of driver="thread"/"caller"."""
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.driver = _resolve_driver(driver, start_thread)
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
        # The "event_loop" driver: its task, and the (loop, event) that wakes it.
        self._task: asyncio.Task[None] | None = None
        self._loop_wakeup: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._task_lock = threading.Lock()
        self._task_exited = threading.Event()
        if self.driver == "thread":
            self._thread = threading.Thread(target=self._run, name="chat-engine-loop", daemon=True)
            self._thread.start()
        elif self.driver == "event_loop" and _running_loop() is not None:
            self._start_loop_task()

    @classmethod
    def from_pretrained(cls, model: str | None = None, **kwargs: Any) -> AsyncEngine:
        options = {name: kwargs.pop(name) for name in ("max_waiting_requests", "driver", "start_thread") if name in kwargs}
        engine = Engine.from_pretrained(model, **kwargs) if model is not None else Engine.from_pretrained(**kwargs)
        return cls(engine, **options)

    # Front: called from event loops
    def generate(self, prompt: PromptInput, params: SamplingParams | None = None, request_id: str | None = None) -> RequestStream:
        """Submit a request: `async for` its state after every step it advanced in (the last one is
        finished), or `await` it for the finished output.

        Leaving the iteration early (break, cancellation, a closed connection) aborts the request.
        """
        return RequestStream(self._outputs(prompt, params, request_id))

    async def _outputs(
        self, prompt: PromptInput, params: SamplingParams | None, request_id: str | None
    ) -> AsyncGenerator[RequestOutput, None]:
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
        if self.driver == "event_loop":
            self._start_loop_task()
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
        self._wake()
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
        self._wake()

    def stats(self) -> EngineStats:
        scheduler = self.engine.generator.scheduler
        block_manager = self.engine.generator.block_manager
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
            num_kv_blocks=block_manager.num_blocks,
            num_free_kv_blocks=block_manager.num_free_blocks,
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
        """Run the engine loop on the calling thread until `stop()` or `shutdown()` (driver="caller")."""
        if self.driver != "caller":
            raise RuntimeError(
                f"this AsyncEngine's loop is run by its {self.driver!r} driver; run_forever() needs driver='caller'"
            )
        self._run()

    def stop(self) -> None:
        """Ask the loop to end (from any thread): requests in flight fail with EngineDeadError."""
        self._closed = True
        self._commands.put(("stop", None))
        self._wake()

    def shutdown(self) -> None:
        """Stop the loop, wait for it to end (unless it waits for this very thread), and shut the engine down."""
        if self._shut_down:
            return
        self._shut_down = True
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
        task = self._task
        if task is not None and not task.done() and _running_loop() is not task.get_loop() and task.get_loop().is_running():
            self._task_exited.wait(timeout=30)  # another thread's loop may be in a step: let it finish
        self.engine.shutdown()

    def __repr__(self) -> str:
        stats = self.stats()
        requests = f"running={stats.num_running}, waiting={stats.num_waiting}"
        return f"AsyncEngine(driver={self.driver!r}, {requests}, engine={self.engine!r})"

    # Back: the engine loop, on a thread ("thread", "caller") or as a task on an event loop ("event_loop")
    def _run(self) -> None:
        while self._drain_commands():
            if self.engine.generator.has_unfinished_requests():
                self._step()
            else:
                self._wakeup.wait()
                self._wakeup.clear()

    async def _run_on_event_loop(self) -> None:
        wakeup = asyncio.Event()
        self._loop_wakeup = (asyncio.get_running_loop(), wakeup)
        self._task_exited.clear()
        try:
            while self._drain_commands():
                if self.engine.generator.has_unfinished_requests():
                    self._step()
                    await asyncio.sleep(0)  # one step at a time: callers read their outputs, the kernel answers
                else:
                    await wakeup.wait()
                    wakeup.clear()
        except BaseException as exc:  # cancelled with its event loop, or interrupted (Ctrl-C in a kernel)
            stopped = RuntimeError("the event loop that ran this AsyncEngine's steps stopped; send the request again")
            self._fail_all(stopped if isinstance(exc, asyncio.CancelledError) else exc)
            raise
        finally:
            self._loop_wakeup = None
            self._task_exited.set()

    def _start_loop_task(self) -> None:
        """Run the engine loop as a task on the running event loop, unless a live one runs it already."""
        with self._task_lock:
            task = self._task
            if task is not None and not task.done() and not task.get_loop().is_closed():
                return
            self._task = asyncio.get_running_loop().create_task(self._run_on_event_loop(), name="chat-engine-loop")

    def _wake(self) -> None:
        self._wakeup.set()
        target = self._loop_wakeup
        if target is not None:
            loop, event = target
            with contextlib.suppress(RuntimeError):  # that loop has closed: its task is gone too
                loop.call_soon_threadsafe(event.set)

    def _step(self) -> None:
        try:
            outputs = self.engine.generator.step()
        except Exception as exc:  # a failed step: fail its requests, then see whether the engine survived
            self._fail_all(exc)
            try:
                self.engine.executor.check_health()
            except Exception as fatal:
                self._dead = fatal
            return
        except BaseException as exc:  # KeyboardInterrupt mid-step: its requests see it; the loop ends
            self._fail_all(exc)
            raise
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
                # Requests, not sequences: a request with n completions (or a server request with several
                # prompts, one request each) counts once per request.
                if len({seq.request_id for seq in generator.scheduler.waiting}) >= self.max_waiting_requests:
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


def _resolve_driver(driver: str, start_thread: bool | None) -> str:
    if driver not in DRIVERS:
        raise ValueError(f"AsyncEngine driver={driver!r} is invalid: expected one of {', '.join(DRIVERS)}")
    if start_thread is not None:
        if driver != "auto":
            raise ValueError(f"pass driver={driver!r} or start_thread={start_thread}, not both")
        return "thread" if start_thread else "caller"
    if driver == "auto":
        return "event_loop" if _running_loop() is not None else "thread"
    return driver


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _send(pending: _Pending, item: RequestOutput | BaseException) -> bool:
    """Hand an item to the request's event loop; False if that loop has closed."""
    try:
        pending.loop.call_soon_threadsafe(pending.outputs.put_nowait, item)
    except RuntimeError:  # "Event loop is closed": its caller is gone
        return False
    return True
