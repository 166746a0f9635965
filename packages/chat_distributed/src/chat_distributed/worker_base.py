"""`LocalOrDistributedWorkerBase`: a worker whose `execute_model` holds all control-plane communication.

Subclasses implement only worker-local logic: `prepare_worker_input`, `execute_worker`, and a
`model_runner` (a `ModelRunnerBase`), plus device and model set-up. In return they run on one
process or on any tensor x pipeline layout, with either control plane.

One step, as `execute_model` runs it:
1. rank 0 prepares the inputs and gets them to every rank (the control plane); the others receive;
2. every rank runs `execute_worker`;
3. a stage other than the first receives the previous stage's IntermediateOutput;
4. the model runner runs this rank's layers;
5. a stage other than the last sends its IntermediateOutput on; the last stage's first tensor-parallel
   rank sampled, and its SamplerOutput goes to rank 0, which returns it to the engine.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from chat_core.engine.execute_model_request import ExecuteModelRequest
from chat_core.outputs import IntermediateOutput, SamplerOutput
from chat_core.worker.model_runner_base import ModelRunnerBase
from chat_core.worker.worker_base import WorkerBase, WorkerInput

from chat_distributed.communication import recv_tensor_dict, send_tensor_dict
from chat_distributed.control_plane import ControlPlane, make_control_plane
from chat_distributed.parallel_state import ParallelGroups


@dataclass
class StepStats:
    """Where a rank's step time goes: getting the inputs (the control plane) against the whole step."""

    steps: int = 0
    step_seconds: float = 0.0
    control_plane_seconds: float = 0.0


class LocalOrDistributedWorkerBase(WorkerBase):
    groups: ParallelGroups  # set by init_device
    model_runner: ModelRunnerBase[Any]
    kv_cache: list[torch.Tensor]
    worker_input_cls: type[WorkerInput] = WorkerInput  # what receivers rebuild the WorkerInput as

    def __init__(self, control_plane: str = "broadcast") -> None:
        self.control_plane: ControlPlane = make_control_plane(control_plane)
        self.step_stats = StepStats()
        self._stopped = False

    @abstractmethod
    def prepare_worker_input(self, request: ExecuteModelRequest) -> WorkerInput:
        """This step's worker-level input. May move data to the device; must not communicate."""

    @abstractmethod
    def execute_worker(self, worker_input: WorkerInput) -> None:
        """The worker's own part of the step (e.g. freeing per-sequence state). Must not communicate."""

    @property
    def is_driver_worker(self) -> bool:
        """Rank 0: the rank the engine talks to."""
        return self.groups.rank == 0

    @property
    def sampling_rank(self) -> int:
        """The global rank that samples: the first tensor-parallel rank of the last stage."""
        return (self.groups.pipeline_parallel_size - 1) * self.groups.tensor_parallel_size

    def execute_model(self, request: ExecuteModelRequest | None = None) -> SamplerOutput | None:
        started = time.perf_counter()
        try:
            return self._execute_model(request, started)
        finally:
            self.step_stats.steps += 1
            self.step_stats.step_seconds += time.perf_counter() - started

    def _execute_model(self, request: ExecuteModelRequest | None, started: float) -> SamplerOutput | None:
        if self.is_driver_worker:
            if request is None:
                raise ValueError("rank 0 must be given the ExecuteModelRequest to run")
            worker_input, model_input = self.control_plane.send(self, request)
        else:
            inputs = self.control_plane.receive(self)
            if inputs is None:
                self._stopped = True
                return None
            worker_input, model_input = inputs
        self.step_stats.control_plane_seconds += time.perf_counter() - started

        self.execute_worker(worker_input)
        if model_input is None:
            return None

        pp = self.groups.pp
        intermediate = None
        if not pp.is_first:
            intermediate = IntermediateOutput.from_broadcasted_tensor_dict(recv_tensor_dict(src=pp.prev_rank, group=pp))
        output = self.model_runner.execute_model(model_input, self.kv_cache, intermediate)
        if isinstance(output, IntermediateOutput):
            send_tensor_dict(output.as_broadcastable_tensor_dict(), dst=pp.next_rank, group=pp)
            output = None

        if self.sampling_rank != 0:  # the sampled tokens live on another rank than the engine's
            if self.groups.rank == self.sampling_rank:
                assert output is not None, "the sampling rank always produces a SamplerOutput"
                send_tensor_dict(output.as_broadcastable_tensor_dict(), dst=0, group=self.groups.world)
                return None
            if self.is_driver_worker:
                return SamplerOutput.from_broadcasted_tensor_dict(recv_tensor_dict(src=self.sampling_rank, group=self.groups.world))
        return output if self.is_driver_worker else None

    def start_worker_execution_loop(self, on_step: Callable[[], None] | None = None) -> None:
        """On ranks other than 0: run steps as rank 0 sends them, until it sends the stop signal.

        `on_step` is called after each step (the process launcher counts steps to spot a stuck rank)."""
        if self.is_driver_worker:
            raise RuntimeError("rank 0 drives the steps; the worker loop is for the other ranks")
        self._stopped = False
        while not self._stopped:
            self.execute_model()
            if on_step is not None:
                on_step()

    def stop_worker_execution_loop(self) -> None:
        """On rank 0: tell every other rank to leave its loop."""
        self.control_plane.send_stop(self)
