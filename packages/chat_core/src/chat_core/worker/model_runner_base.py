"""The model runner interface: one model on one device, driven by typed, frozen inputs.

A runner turns an `ExecuteModelRequest` into its own `ModelInput` (moving data to its device) and
runs the model on it. It may run the collectives the model itself needs (tensor-parallel
all-reduce inside a layer), but it never sends or receives control-plane messages: deciding what
to run, and getting inputs to other ranks, is the worker's job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from chat_core.engine.execute_model_request import ExecuteModelRequest
from chat_core.outputs import IntermediateOutput, SamplerOutput
from chat_core.tensor_dict import TensorDictMixin


@dataclass(frozen=True)
class ModelInput(TensorDictMixin):
    """Base of every runner's input. Subclasses are frozen dataclasses that state all their fields;
    tensors in them are already on the runner's device. `as_broadcastable_tensor_dict` and
    `from_broadcasted_tensor_dict` round-trip to an equal object."""


T = TypeVar("T", bound=ModelInput)


class ModelRunnerBase(ABC, Generic[T]):
    """Subclass per kind of model or hardware; pair it with its own `ModelInput` subclass."""

    @abstractmethod
    def load_model(self, checkpoint: Any) -> None:
        """Build the model and read this rank's weights from `checkpoint`."""

    @abstractmethod
    def allocate_kv_cache(self, num_blocks: int) -> list[torch.Tensor]:
        """The KV cache of this rank's layers, `num_blocks` blocks each."""

    @abstractmethod
    def kv_cache_bytes_per_block(self) -> int:
        """Bytes one block of cache takes on this rank, over all its layers."""

    @abstractmethod
    def prepare_model_input(self, request: ExecuteModelRequest) -> T:
        """The inputs of `execute_model` for this step, on this runner's device.

        May move data to the device. Must not communicate with other workers or devices.
        """

    @abstractmethod
    def make_model_input_from_broadcasted_tensor_dict(self, tensor_dict: dict[str, Any]) -> T:
        """Rebuild the input that `prepare_model_input` made on another rank from its broadcast dict."""

    @abstractmethod
    def execute_model(
        self,
        model_input: T,
        kv_cache: list[torch.Tensor],
        intermediate: IntermediateOutput | None = None,
    ) -> SamplerOutput | IntermediateOutput | None:
        """Run one step. A pipeline stage other than the last returns its IntermediateOutput; the last
        returns the SamplerOutput (None on ranks that do not sample). No control-plane messages here."""
