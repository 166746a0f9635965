"""Worker processes spawned from the main script: start, watch, and always stop them.

Each process runs one rank's worker loop. They rendezvous through a file (no port to pick), count
the steps they finish in shared memory (so a stuck rank can be named), exit on their own if the
main process disappears, and are terminated, then killed, by `stop()` if they do not leave.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
from typing import Any

from chat_core.engine_config import EngineConfig


class WorkerFailedError(RuntimeError):
    """A rank died or stopped answering; the message names it."""


class WorkerProcesses:
    def __init__(self, config: EngineConfig) -> None:
        self.world_size = config.world_size
        self._dir = tempfile.mkdtemp(prefix="chat-distributed-")
        self.init_method = f"file://{os.path.join(self._dir, 'rendezvous')}"
        ctx = mp.get_context("spawn")
        self.steps = ctx.Array("q", self.world_size, lock=False)  # steps finished, per rank
        self.processes: dict[int, Any] = {}
        for rank in range(1, self.world_size):
            process = ctx.Process(
                target=run_worker_process,
                args=(rank, config, self.init_method, self.steps, os.getpid()),
                name=f"chat-worker-rank{rank}",
                daemon=True,
            )
            process.start()
            self.processes[rank] = process

    def dead_ranks(self) -> dict[int, int | None]:
        """Ranks whose process has exited, with their exit codes."""
        return {rank: p.exitcode for rank, p in self.processes.items() if not p.is_alive()}

    def lagging_ranks(self) -> list[int]:
        """Ranks that have finished fewer steps than rank 0: the ones a stuck step waits for."""
        driver_steps = self.steps[0]
        return [rank for rank in self.processes if self.steps[rank] < driver_steps]

    def count_driver_step(self) -> None:
        self.steps[0] += 1

    def describe_failure(self) -> str | None:
        dead = self.dead_ranks()
        if dead:
            return "; ".join(f"worker rank {rank} (pid {self.processes[rank].pid}) died with exit code {code}" for rank, code in sorted(dead.items()))
        lagging = self.lagging_ranks()
        if lagging:
            return f"worker rank(s) {lagging} stopped answering (still on an earlier step)"
        return None

    def stop(self, timeout: float = 10.0) -> None:
        """Wait for the processes to leave, then terminate and kill whatever is left. Safe to call twice."""
        stop_processes(list(self.processes.values()), timeout)
        shutil.rmtree(self._dir, ignore_errors=True)


def stop_processes(processes: list[Any], timeout: float) -> None:
    """Give `processes` until `timeout` to exit on their own, then terminate, then kill what is left."""
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(2.0)


def run_worker_process(rank: int, config: EngineConfig, init_method: str, steps: Any, parent_pid: int) -> None:
    """The body of a spawned rank: join, load, allocate the cache, serve steps until told to stop."""
    _exit_when_parent_dies(parent_pid)
    from chat_distributed.worker import serve_rank

    def count_step() -> None:
        steps[rank] += 1

    serve_rank(config, rank=rank, init_method=init_method, on_step=count_step)


def _exit_when_parent_dies(parent_pid: int) -> None:
    """A rank must never outlive the process that started it, even one killed with SIGKILL."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
