"""The worker interface: owns a device, a model runner and the KV cache of its layers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from chat_core.engine.execute_model_request import ExecuteModelRequest
from chat_core.outputs import SamplerOutput
from chat_core.tensor_dict import TensorDictMixin


@dataclass(frozen=True)
class WorkerInput(TensorDictMixin):
    """What the worker itself (not the model runner) needs for a step."""

    num_seqs: int = 0
    finished_seq_ids: list[int] = field(default_factory=list)


class WorkerBase(ABC):
    @abstractmethod
    def init_device(self) -> None:
        """Pick and prepare the device (and, for distributed workers, join the process groups)."""

    @abstractmethod
    def load_model(self) -> None: ...

    @abstractmethod
    def determine_num_available_blocks(self) -> int:
        """How many KV-cache blocks fit in the memory this worker may use."""

    @abstractmethod
    def initialize_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute_model(self, request: ExecuteModelRequest | None = None) -> SamplerOutput | None:
        """Run one step. Returns the sampled tokens on the rank that reports them, else None."""

    def shutdown(self) -> None:
        """Release what the worker holds; the default holds nothing that needs it."""
