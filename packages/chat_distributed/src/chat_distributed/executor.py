"""Rank 0's executor: the driver worker runs in the engine's process, the other ranks elsewhere
(processes it spawned, or peers started by torchrun). Any failure names the rank it came from."""

from __future__ import annotations

import os
import threading
import time
import traceback

import torch

from chat_core.checkpoint.checkpoint import Checkpoint
from chat_core.engine.execute_model_request import ExecuteModelRequest
from chat_core.engine.executor import Executor
from chat_core.engine_config import EngineConfig
from chat_core.outputs import SamplerOutput

from chat_distributed.parallel_state import destroy_distributed
from chat_distributed.processes import WorkerFailedError, WorkerProcesses
from chat_distributed.worker import DistributedWorker


class DistributedExecutor(Executor):
    def __init__(
        self,
        config: EngineConfig,
        checkpoint: Checkpoint,
        *,
        init_method: str | None,
        processes: WorkerProcesses | None = None,
    ) -> None:
        self.config = config
        self.processes = processes
        self._failure: WorkerFailedError | None = None
        self._closed = False
        self._lock = threading.Lock()  # one step at a time, whatever thread calls
        self._threads = torch.get_num_threads()  # restored at shutdown: this may be the user's process
        self.driver = DistributedWorker(config, rank=0, init_method=init_method, checkpoint=checkpoint)
        try:
            self._guarded(self._start)
        except BaseException:
            self.shutdown()
            raise

    def _start(self) -> None:
        self.driver.init_device()
        self.driver.load_model()
        self.num_kv_blocks = self.driver.determine_num_available_blocks()
        self.driver.initialize_cache(self.num_kv_blocks)

    def execute_model(self, request: ExecuteModelRequest) -> SamplerOutput:
        with self._lock:
            output = self._guarded(lambda: self.driver.execute_model(request), counts_as_step=True)
        assert output is not None, "rank 0 always gets the sampled tokens back"
        return output

    def _guarded(self, step, counts_as_step: bool = False):
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise RuntimeError("the distributed executor has been shut down")
        if counts_as_step and self.processes is not None:
            self.processes.begin_driver_step()
        started = time.monotonic()
        try:
            return step()
        except Exception as exc:
            self._failure = WorkerFailedError(f"distributed inference failed: {self._explain(exc, started)}")
            raise self._failure from exc
        except BaseException as exc:
            # Ctrl-C lands between two collectives: the other ranks are left inside this step.
            self._failure = WorkerFailedError(
                f"distributed inference was interrupted in the middle of a step ({type(exc).__name__}); "
                "the ranks are no longer in step: shut this engine down and start a new one"
            )
            raise

    def _explain(self, exc: Exception, started: float) -> str:
        """Name the rank to blame for `exc`, raised by a step (or start-up) that began at `started`."""
        if not _raised_by_torch_distributed(exc):
            return f"rank 0 failed: {type(exc).__name__}: {exc}"
        cause = None
        if self.processes is not None:
            # After a timeout, look at once, before the stuck rank is pushed over by our broken connection;
            # after a broken connection, give the rank that broke it a moment to be seen dead.
            timed_out = time.monotonic() - started >= 0.9 * self.config.distributed_timeout_s
            cause = self.processes.describe_failure(wait_for_exit_s=0.0 if timed_out else 1.0)
        return cause or f"a collective with the other ranks failed: {exc}"

    def check_health(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self.processes is not None and not self._closed:
            cause = self.processes.describe_ill_health()
            if cause:
                self._failure = WorkerFailedError(f"distributed inference failed: {cause}")
                raise self._failure

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        stopped = False
        if self._failure is None and getattr(self.driver, "groups", None) is not None:
            try:
                self.driver.stop_worker_execution_loop()
                stopped = True
            except Exception:
                pass  # the others are gone already; stop() below makes sure
        if self.processes is not None:
            self.processes.stop(graceful=stopped)  # after a failure, no rank is waited for
        destroy_distributed()
        torch.set_num_threads(self._threads)


def _raised_by_torch_distributed(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) came out of torch.distributed: a collective that
    failed or timed out, which another rank is to blame for; anything else is rank 0's own error."""
    seen: BaseException | None = exc
    while seen is not None:
        frames = traceback.extract_tb(seen.__traceback__)
        if any(f"torch{os.sep}distributed{os.sep}" in frame.filename for frame in frames):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def create_distributed_executor(config: EngineConfig, checkpoint: Checkpoint) -> DistributedExecutor:
    """Under torchrun, join the world it made (this must be rank 0); otherwise spawn the other ranks."""
    torchrun_world = int(os.environ.get("WORLD_SIZE", "1"))
    if torchrun_world > 1:
        rank = int(os.environ.get("RANK", "0"))
        if torchrun_world != config.world_size:
            raise ValueError(
                f"torchrun started {torchrun_world} processes, but tensor_parallel_size={config.tensor_parallel_size} x "
                f"pipeline_parallel_size={config.pipeline_parallel_size} needs {config.world_size}"
            )
        if rank != 0:
            raise RuntimeError(f"only rank 0 builds the engine; rank {rank} should run chat_distributed.run_worker")
        return DistributedExecutor(config, checkpoint, init_method="env://")
    processes = WorkerProcesses(config)
    try:
        processes.wait_until_started()
        return DistributedExecutor(config, checkpoint, init_method=processes.init_method, processes=processes)
    except BaseException:
        processes.stop(graceful=False)
        raise
