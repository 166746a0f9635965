"""Executors run a step on the workers: `LocalExecutor` on one in-process worker.

The Generator talks only to an executor, never to a process group; `chat_distributed` provides
executors whose workers live in other processes, behind the same three members.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from chat_core.checkpoint.checkpoint import Checkpoint
from chat_core.engine.execute_model_request import ExecuteModelRequest
from chat_core.engine_config import EngineConfig
from chat_core.outputs import SamplerOutput
from chat_core.worker.worker import Worker


class Executor(ABC):
    num_kv_blocks: int  # blocks of KV cache every rank holds (the smallest over ranks)

    @abstractmethod
    def execute_model(self, request: ExecuteModelRequest) -> SamplerOutput:
        """Run one step everywhere it needs to run; return the sampled tokens."""

    def check_health(self) -> None:
        """Raise if a worker is gone; a local worker is always there."""

    def shutdown(self) -> None:
        """Stop the workers; safe to call twice."""


class LocalExecutor(Executor):
    def __init__(self, engine_config: EngineConfig, checkpoint: Checkpoint) -> None:
        self.worker = Worker(engine_config, checkpoint=checkpoint)
        self.worker.init_device()
        self.worker.load_model()
        self.num_kv_blocks = self.worker.determine_num_available_blocks()
        self.worker.initialize_cache(self.num_kv_blocks)

    def execute_model(self, request: ExecuteModelRequest) -> SamplerOutput:
        output = self.worker.execute_model(request)
        assert output is not None, "the local worker always samples"
        return output

    def shutdown(self) -> None:
        self.worker.shutdown()
