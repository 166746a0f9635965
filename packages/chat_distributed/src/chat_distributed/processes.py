"""Worker processes started from the engine's process: launch, watch, and always stop them.

Each rank other than 0 is its own interpreter on a module of ours (`python -m chat_distributed.worker_main`),
never a re-run of the user's main module, so scripts without a main guard, `python -c`, the REPL and
notebooks all work. It gets a `WorkerLaunch` on stdin, with the engine config pickled by cloudpickle
(a model runner class defined in `__main__` or a notebook cell travels by value), and the parent's
`sys.path` (so classes in the user's own modules import the same). The ranks rendezvous through a file
in a private temporary directory (no port to pick) and report their phase, steps and heartbeat on a
status board there, which names the rank a failed step waited for. They exit on their own if this
process disappears; `stop()`, or interpreter exit, kills whatever is left and removes the directory.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from typing import Union

import cloudpickle

from chat_core.engine_config import EngineConfig

from chat_distributed.status_board import JOINING, PHASES, SERVING, STALE_HEARTBEAT_S, RankStatusBoard

AnyProcess = Union[subprocess.Popen, multiprocessing.process.BaseProcess]


class WorkerFailedError(RuntimeError):
    """A rank died or stopped answering; the message names it."""


@dataclass(frozen=True)
class WorkerLaunch:
    """What a spawned rank needs, sent on its stdin."""

    world_size: int
    init_method: str  # file:// rendezvous inside `directory`
    directory: str  # the launch's private temporary directory, removed by whoever stops last
    status_path: str  # the RankStatusBoard file
    parent_pid: int
    config: bytes  # the EngineConfig, pickled with cloudpickle


class WorkerProcesses:
    """Ranks 1..world_size-1 of `config`, started at once; `wait_until_started()` before joining them."""

    def __init__(self, config: EngineConfig) -> None:
        self.world_size = config.world_size
        self.timeout_s = config.distributed_timeout_s
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.driver_steps = 0  # steps rank 0 has begun
        try:
            config_bytes = cloudpickle.dumps(config)
        except Exception as exc:
            raise TypeError(
                f"the engine config cannot be sent to the worker processes ({exc}); every field, "
                "model_runner_cls and extra included, must be picklable by cloudpickle"
            ) from exc
        directory = tempfile.mkdtemp(prefix="chat-distributed-")
        self.board = RankStatusBoard.create(os.path.join(directory, "status"), self.world_size)
        self._finalizer = weakref.finalize(self, _kill_and_remove, self.processes, self.board, directory)
        self.init_method = f"file://{os.path.join(directory, 'rendezvous')}"
        launch = WorkerLaunch(self.world_size, self.init_method, directory, self.board.path, os.getpid(), config_bytes)
        try:
            env = _worker_env()
            for rank in range(1, self.world_size):
                self.processes[rank] = subprocess.Popen(_worker_command(rank), stdin=subprocess.PIPE, env=env)
            payload = pickle.dumps(launch, protocol=pickle.HIGHEST_PROTOCOL)
            for process in self.processes.values():
                _send(process, payload)
        except BaseException:
            self.stop(graceful=False)
            raise

    def wait_until_started(self, timeout: float | None = None) -> None:
        """Wait until every rank has read its config and is about to join, so that the rendezvous's own
        timeout need not cover interpreter start-up; raise `WorkerFailedError` if one dies first."""
        limit = max(self.timeout_s, 120.0) if timeout is None else timeout
        deadline = time.monotonic() + limit
        while (waiting := [rank for rank in self.processes if self.board.phase(rank) < JOINING]):
            if self.dead_ranks():
                raise WorkerFailedError(f"starting the worker processes failed: {self.describe_failure()}")
            if time.monotonic() > deadline:
                raise WorkerFailedError(f"worker rank(s) {waiting} did not start within {limit:.0f} s")
            time.sleep(0.02)

    def begin_driver_step(self) -> None:
        self.driver_steps += 1

    def dead_ranks(self) -> dict[int, int]:
        """Ranks whose process has exited, with their exit codes."""
        return {rank: code for rank, process in self.processes.items() if (code := process.poll()) is not None}

    def frozen_ranks(self, after_s: float = STALE_HEARTBEAT_S) -> dict[int, float]:
        """Live ranks with no heartbeat for more than `after_s` seconds (stopped, e.g. by SIGSTOP, or frozen)."""
        silent = {rank: self.board.seconds_since_heartbeat(rank) for rank in self.processes}
        return {rank: age for rank, age in silent.items() if age > after_s and self.processes[rank].poll() is None}

    def lagging_ranks(self) -> list[int]:
        """Live ranks that have not finished the step rank 0 began (or, before any step, not reached it)."""
        return [
            rank
            for rank, process in self.processes.items()
            if process.poll() is None
            and (self.board.steps(rank) < self.driver_steps or (self.driver_steps == 0 and self.board.phase(rank) < SERVING))
        ]

    def describe_failure(self, wait_for_exit_s: float = 1.0) -> str | None:
        """What went wrong, naming the ranks: dead ones, else stopped ones, else those still in the step.

        A rank killed mid-step breaks its connections just before it is seen to exit: wait a moment for that."""
        deadline = time.monotonic() + wait_for_exit_s
        while not (dead := self.dead_ranks()) and time.monotonic() < deadline:
            time.sleep(0.02)
        if dead:
            return "; ".join(
                f"worker rank {rank} (pid {self.processes[rank].pid}) died with exit code {code}{_signal_name(code)} "
                f"while {self._phase(rank)}"
                for rank, code in sorted(dead.items())
            )
        frozen = self.frozen_ranks()
        if frozen:
            return "; ".join(
                f"worker rank {rank} (pid {self.processes[rank].pid}) has shown no sign of life for {age:.1f} s "
                f"while {self._phase(rank)}: it is stopped (e.g. by SIGSTOP) or frozen"
                for rank, age in sorted(frozen.items())
            )
        lagging = self.lagging_ranks()
        if lagging:
            what = f"step {self.driver_steps}" if self.driver_steps else "starting up"
            return "; ".join(
                f"worker rank {rank} (pid {self.processes[rank].pid}) is alive but has not finished {what}: "
                f"stuck while {self._phase(rank)} (e.g. in a collective)"
                for rank in lagging
            )
        return None

    def describe_ill_health(self) -> str | None:
        """A dead rank, or one silent for longer than the timeout: the engine cannot go on."""
        if self.dead_ranks() or self.frozen_ranks(after_s=self.timeout_s):
            return self.describe_failure(wait_for_exit_s=0.0)
        return None

    def _phase(self, rank: int) -> str:
        phase = self.board.phase(rank)
        return PHASES[phase] if 0 <= phase < len(PHASES) else f"in phase {phase}"

    def stop(self, *, graceful: bool = True, timeout: float = 10.0) -> None:
        """With `graceful` (rank 0 told them to stop), give the ranks `timeout` to leave; then kill whatever
        is left and remove the launch directory. Safe to call twice."""
        if graceful:
            stop_processes(list(self.processes.values()), timeout)
        self._finalizer()


def stop_processes(processes: list[AnyProcess], timeout: float, grace: float = 2.0) -> None:
    """Give `processes` (subprocess.Popen or multiprocessing.Process) `timeout` to exit on their own, then
    `grace` after SIGTERM, then kill what is left (SIGKILL also ends a stopped process, SIGTERM does not)."""
    deadline = time.monotonic() + timeout
    for process in processes:
        _wait(process, max(0.0, deadline - time.monotonic()))
    for process in processes:
        if _running(process) and grace > 0:
            process.terminate()
            _wait(process, grace)
        if _running(process):
            process.kill()
            _wait(process, 5.0)


def _running(process: AnyProcess) -> bool:
    return process.poll() is None if isinstance(process, subprocess.Popen) else process.is_alive()


def _wait(process: AnyProcess, timeout: float) -> None:
    if isinstance(process, subprocess.Popen):
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    else:
        process.join(timeout)


def _kill_and_remove(processes: dict[int, subprocess.Popen[bytes]], board: RankStatusBoard, directory: str) -> None:
    """The end of every launch (stop, a failed start, or interpreter exit): nothing may survive it."""
    stop_processes(list(processes.values()), timeout=0.0, grace=0.0)
    board.close()
    shutil.rmtree(directory, ignore_errors=True)


def _send(process: subprocess.Popen[bytes], payload: bytes) -> None:
    assert process.stdin is not None
    try:
        process.stdin.write(payload)
        process.stdin.close()
    except BrokenPipeError:
        pass  # it died before reading; wait_until_started reports its exit code


def _worker_command(rank: int) -> list[str]:
    if not sys.executable:
        raise RuntimeError("cannot start worker processes: sys.executable is empty in this interpreter")
    # -P: the working directory must not shadow our modules (the parent's own path comes in PYTHONPATH).
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe_path, "-m", "chat_distributed.worker_main", "--rank", str(rank)]


def _worker_env() -> dict[str, str]:
    """This process's environment, with its `sys.path` as PYTHONPATH: the rank imports what we import."""
    path = [os.path.abspath(entry) if entry else os.getcwd() for entry in sys.path if isinstance(entry, str)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(path))}


def _signal_name(code: int) -> str:
    if code >= 0:
        return ""
    try:
        return f" ({signal.Signals(-code).name})"
    except ValueError:
        return ""
