"""How one step's inputs reach every rank. Two interchangeable ways, giving identical tokens:

- `BroadcastControlPlane` (the vLLM RFC's default): rank 0 prepares the WorkerInput and ModelInput and
  broadcasts them as one tensor dict; the other ranks rebuild them.
- `SpmdControlPlane`: rank 0 broadcasts the small ExecuteModelRequest, and only what changed since the
  last step (see `request_delta.py`); every rank prepares its own inputs.

Both are used only from `LocalOrDistributedWorkerBase.execute_model`, over the groups' `control` group:
the other ranks may wait there as long as the engine stays idle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from chat_core.engine.execute_model_request import ExecuteModelRequest
from chat_core.worker.model_runner_base import ModelInput
from chat_core.worker.worker_base import WorkerInput

from chat_distributed.communication import broadcast_tensor_dict
from chat_distributed.request_delta import RequestDeltaDecoder, RequestDeltaEncoder

if TYPE_CHECKING:
    from chat_distributed.worker_base import LocalOrDistributedWorkerBase

StepInputs = tuple[WorkerInput, ModelInput | None]
_STOP = "stop"


class ControlPlane(ABC):
    @abstractmethod
    def send(self, worker: LocalOrDistributedWorkerBase, request: ExecuteModelRequest) -> StepInputs:
        """On rank 0: get this step to every rank; returns rank 0's own inputs."""

    @abstractmethod
    def receive(self, worker: LocalOrDistributedWorkerBase) -> StepInputs | None:
        """On the other ranks: this step's inputs, or None when rank 0 says stop."""

    def send_stop(self, worker: LocalOrDistributedWorkerBase) -> None:
        broadcast_tensor_dict({_STOP: True}, src=0, group=worker.groups.control)


def _prepare(worker: LocalOrDistributedWorkerBase, request: ExecuteModelRequest) -> StepInputs:
    worker_input = worker.prepare_worker_input(request)
    model_input = None if request.is_empty else worker.model_runner.prepare_model_input(request)
    return worker_input, model_input


class BroadcastControlPlane(ControlPlane):
    def send(self, worker: LocalOrDistributedWorkerBase, request: ExecuteModelRequest) -> StepInputs:
        worker_input, model_input = _prepare(worker, request)
        message: dict[str, Any] = _prefixed("worker.", worker_input.as_broadcastable_tensor_dict())
        if model_input is not None:
            message.update(_prefixed("model.", model_input.as_broadcastable_tensor_dict()))
        broadcast_tensor_dict(message, src=0, group=worker.groups.control)
        return worker_input, model_input

    def receive(self, worker: LocalOrDistributedWorkerBase) -> StepInputs | None:
        message = broadcast_tensor_dict(src=0, group=worker.groups.control)
        if message.get(_STOP):
            return None
        worker_input = worker.worker_input_cls.from_broadcasted_tensor_dict(_unprefixed("worker.", message))
        model_part = _unprefixed("model.", message)
        model_input = worker.model_runner.make_model_input_from_broadcasted_tensor_dict(model_part) if model_part else None
        return worker_input, model_input


class SpmdControlPlane(ControlPlane):
    def __init__(self) -> None:
        self.encoder = RequestDeltaEncoder()
        self.decoder = RequestDeltaDecoder()

    def send(self, worker: LocalOrDistributedWorkerBase, request: ExecuteModelRequest) -> StepInputs:
        broadcast_tensor_dict({"delta": self.encoder.encode(request)}, src=0, group=worker.groups.control)
        return _prepare(worker, request)

    def receive(self, worker: LocalOrDistributedWorkerBase) -> StepInputs | None:
        message = broadcast_tensor_dict(src=0, group=worker.groups.control)
        if message.get(_STOP):
            return None
        return _prepare(worker, self.decoder.decode(message["delta"]))


def make_control_plane(name: str) -> ControlPlane:
    if name == "broadcast":
        return BroadcastControlPlane()
    if name == "spmd":
        return SpmdControlPlane()
    raise ValueError(f"control plane {name!r} is unknown; expected 'broadcast' or 'spmd'")


def _prefixed(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {prefix + key: value for key, value in values.items()}


def _unprefixed(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {key[len(prefix) :]: value for key, value in values.items() if key.startswith(prefix)}
