"""Real ranks for tests: N spawned processes in one gloo world, each serving function calls from a queue.

    with RankPool(world_size=3) as pool:
        results = pool.run(some_module_level_function, arg)       # one result per rank, in rank order
        results = pool.run_each({0: (send, d), 1: (recv,)})       # different calls on different ranks

The calling process is not a rank. Functions travel by reference (pickle), so they must be importable
module-level functions; arguments and results travel pickled (tensors as copies, not shared memory).
A call that raises comes back as `RankError` with the rank's traceback; a rank that dies or a call that
outlives `call_timeout` also raises `RankError` instead of hanging. Processes are daemons and `close()`
(or leaving the `with`) terminates whatever is left.
"""

from __future__ import annotations

import os
import pickle
import queue
import shutil
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.multiprocessing as mp

from chat_distributed.parallel_state import destroy_distributed, init_distributed
from chat_distributed.processes import stop_processes

_STOP = None


class RankError(RuntimeError):
    """A call on a rank raised, or the rank died or gave no answer in time."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"rank {rank}: {message}")
        self.rank = rank


class RankPool:
    """`world_size` spawned ranks joined through a FileStore (no ports), serving calls until closed.

    `timeout` is the process groups' timeout (seconds), so a collective with a dead peer fails within it;
    `call_timeout` bounds how long the pool waits for one call's result.
    """

    def __init__(
        self,
        world_size: int,
        *,
        timeout: float = 60.0,
        call_timeout: float = 120.0,
        start_timeout: float = 120.0,
        num_threads: int = 1,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        self.world_size = world_size
        self.timeout = timeout
        self.call_timeout = call_timeout
        self.start_timeout = start_timeout
        self.num_threads = num_threads
        self.start_seconds: float | None = None
        self._processes: list[Any] = []
        self._tasks: list[Any] = []
        self._results: list[Any] = []
        self._next_seq = [0] * world_size
        self._pending: list[list[tuple[int, str]]] = [[] for _ in range(world_size)]
        self._store_dir: str | None = None
        self._finalizer: weakref.finalize | None = None

    def __enter__(self) -> RankPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> RankPool:
        """Spawn the ranks, wait until all have imported, then join them into one world."""
        if self._processes:
            raise RuntimeError("this RankPool is already started")
        began = time.monotonic()
        self._store_dir = tempfile.mkdtemp(prefix="chat-distributed-store-")
        context = mp.get_context("spawn")
        for rank in range(self.world_size):
            tasks, results = context.Queue(), context.Queue()
            process = context.Process(
                target=_serve, args=(rank, self.num_threads, tasks, results), name=f"rank-{rank}", daemon=True
            )
            process.start()
            self._processes.append(process)
            self._tasks.append(tasks)
            self._results.append(results)
        self._finalizer = weakref.finalize(
            self, _stop_processes, list(self._processes), list(self._tasks), self._store_dir
        )
        try:
            for rank in range(self.world_size):
                self._pending[rank].append((0, "start"))
                self._next_seq[rank] = 1
                self.result(rank, timeout=self.start_timeout)
            # Only now, with every rank imported, join: rendezvous then needs far less than `timeout`.
            init_method = f"file://{os.path.join(self._store_dir, 'store')}"
            self.run(_init_rank, self.world_size, init_method, self.timeout, timeout=self.start_timeout)
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def submit(self, rank: int, fn: Callable[..., Any], *args: Any) -> None:
        """Queue `fn(*args)` on `rank`; collect it with `result(rank)`. Calls on one rank run in order."""
        if not 0 <= rank < len(self._processes):
            raise ValueError(f"rank {rank} is not in this started pool of {len(self._processes)} ranks")
        seq = self._next_seq[rank]
        self._next_seq[rank] += 1
        self._tasks[rank].put((seq, pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)))
        self._pending[rank].append((seq, getattr(fn, "__qualname__", repr(fn))))

    def result(self, rank: int, timeout: float | None = None) -> Any:
        """The result of the oldest uncollected call on `rank`; raises `RankError` if it failed."""
        if not self._pending[rank]:
            raise RuntimeError(f"no call is pending on rank {rank}")
        seq, name = self._pending[rank].pop(0)
        limit = self.call_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        process, results = self._processes[rank], self._results[rank]
        while True:
            try:
                got_seq, ok, payload = results.get(timeout=0.05)
            except queue.Empty:
                if not process.is_alive():
                    try:  # it may have answered just before exiting
                        got_seq, ok, payload = results.get(timeout=0.5)
                    except queue.Empty:
                        raise RankError(rank, f"process exited with code {process.exitcode} during {name}") from None
                elif time.monotonic() > deadline:
                    raise RankError(rank, f"no result from {name} within {limit:.1f}s") from None
                else:
                    continue
            if got_seq < seq:
                continue  # the answer to a call we already gave up on
            if not ok:
                raise RankError(rank, f"{name} raised:\n{payload}")
            return pickle.loads(payload)

    def run(
        self, fn: Callable[..., Any], *args: Any, ranks: Sequence[int] | None = None, timeout: float | None = None
    ) -> list[Any]:
        """`fn(*args)` on each of `ranks` (default: all), concurrently; results in the order of `ranks`."""
        ranks = list(range(self.world_size)) if ranks is None else list(ranks)
        results = self.run_each({rank: (fn, *args) for rank in ranks}, timeout=timeout)
        return [results[rank] for rank in ranks]

    def run_each(self, calls: Mapping[int, tuple[Any, ...]], timeout: float | None = None) -> dict[int, Any]:
        """`{rank: (fn, *args)}`: run each rank's call concurrently; returns `{rank: result}`.

        If a call fails, the others get a short grace period, then one `RankError` reports every failure.
        """
        for rank, (fn, *args) in calls.items():
            self.submit(rank, fn, *args)
        results: dict[int, Any] = {}
        failures: list[RankError] = []
        for rank in calls:
            try:
                grace = min(timeout or self.call_timeout, 5.0) if failures else timeout
                results[rank] = self.result(rank, timeout=grace)
            except RankError as error:
                failures.append(error)
        if failures:
            raise RankError(failures[0].rank, "\n".join(str(error) for error in failures)) from failures[0]
        return results

    def close(self) -> None:
        """Stop every rank (politely, then by force) and remove the store. Safe to call twice."""
        if self._finalizer is not None:
            self._finalizer()
        self._processes, self._tasks, self._results = [], [], []


def _stop_processes(processes: list[Any], tasks: list[Any], store_dir: str | None) -> None:
    for process, task_queue in zip(processes, tasks):
        if process.is_alive():
            try:
                task_queue.put(_STOP)
            except (OSError, ValueError):
                pass
        task_queue.cancel_join_thread()  # a dead reader must not block our exit
    stop_processes(processes, timeout=5.0)
    if store_dir is not None:
        shutil.rmtree(store_dir, ignore_errors=True)


def _init_rank(world_size: int, init_method: str, timeout: float) -> None:
    init_distributed(rank=_RANK, world_size=world_size, init_method=init_method, backend="gloo", timeout=timeout)


_RANK = -1


def _serve(rank: int, num_threads: int, tasks: Any, results: Any) -> None:
    """A rank's loop: run each queued call, answer with (seq, ok, pickled result or traceback)."""
    global _RANK
    _RANK = rank
    torch.set_num_threads(num_threads)  # the ranks share the machine's cores
    results.put((0, True, pickle.dumps(None)))
    try:
        while (item := tasks.get()) is not _STOP:
            seq, payload = item
            try:
                fn, args = pickle.loads(payload)
                answer = (seq, True, pickle.dumps(fn(*args), protocol=pickle.HIGHEST_PROTOCOL))
            except Exception:
                answer = (seq, False, traceback.format_exc())
            results.put(answer)
    finally:
        destroy_distributed()
