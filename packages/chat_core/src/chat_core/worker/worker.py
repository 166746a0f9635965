"""The worker of one rank: device, model runner, KV cache; and the local `execute_model`.

`Worker` implements every worker-local step. Run alone (one process), its `execute_model` simply
prepares the inputs and runs them. `chat_distributed` reuses the same local steps and puts the
control plane around them.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import sys
from typing import Any

import torch

from chat_core.checkpoint.checkpoint import Checkpoint, open_checkpoint
from chat_core.engine.execute_model_request import ExecuteModelRequest
from chat_core.engine_config import EngineConfig
from chat_core.outputs import SamplerOutput
from chat_core.parallel import SINGLE_RANK, PipelineStage, TensorParallelGroup, split_layers
from chat_core.worker.model_runner import LlamaModelRunner
from chat_core.worker.model_runner_base import ModelRunnerBase
from chat_core.worker.worker_base import WorkerBase, WorkerInput


class Worker(WorkerBase):
    def __init__(
        self,
        engine_config: EngineConfig,
        *,
        checkpoint: Checkpoint | None = None,
        tp: TensorParallelGroup = SINGLE_RANK,
        pipeline_rank: int = 0,
    ) -> None:
        self.engine_config = engine_config
        self.checkpoint = checkpoint
        self.tp = tp
        self.pipeline_rank = pipeline_rank
        self.device = torch.device("cpu")
        self.model_runner: ModelRunnerBase[Any] | None = None
        self.kv_cache: list[torch.Tensor] = []

    def init_device(self) -> None:
        self.device = torch.device(self.engine_config.device)
        if self.device.type == "cuda":
            if self.device.index is None:  # "cuda": the current device, named, so every tensor agrees on it
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        torch.manual_seed(self.engine_config.seed)

    def load_model(self) -> None:
        if self.checkpoint is None:
            self.checkpoint = open_checkpoint(self.engine_config.model)
        self.engine_config = self.engine_config.resolved_for(self.checkpoint)
        model_config = self.checkpoint.config
        num_stages = self.engine_config.pipeline_parallel_size
        layer_ranges = split_layers(model_config.num_layers, num_stages, _as_list(self.engine_config.layers_per_stage))
        start, end = layer_ranges[self.pipeline_rank]
        stage = PipelineStage(rank=self.pipeline_rank, size=num_stages, start_layer=start, end_layer=end)
        runner_cls = resolve_model_runner_cls(self.engine_config.model_runner_cls)
        self.model_runner = runner_cls(self.engine_config, model_config, device=self.device, tp=self.tp, stage=stage)
        self.model_runner.load_model(self.checkpoint)
        self.checkpoint.release_tensors()
        _return_freed_memory()

    def determine_num_available_blocks(self) -> int:
        assert self.model_runner is not None, "load_model() first"
        budget = int(self.engine_config.kv_cache_memory_gib * 2**30)
        return max(1, budget // self.model_runner.kv_cache_bytes_per_block())

    def initialize_cache(self, num_blocks: int) -> None:
        assert self.model_runner is not None, "load_model() first"
        self.kv_cache = self.model_runner.allocate_kv_cache(num_blocks)

    # Worker-local steps, shared with the distributed worker.
    def prepare_worker_input(self, request: ExecuteModelRequest) -> WorkerInput:
        """This step's worker-level input. Must not communicate with other workers."""
        return WorkerInput(num_seqs=len(request.scheduled), finished_seq_ids=list(request.finished_seq_ids))

    def execute_worker(self, worker_input: WorkerInput) -> None:
        """The worker's own part of a step, before the model runs. The default worker keeps no
        per-sequence state (the KV cache is addressed by block tables), so there is nothing to do;
        a subclass that keeps some frees it here for `worker_input.finished_seq_ids`."""

    def device_context(self) -> contextlib.AbstractContextManager[Any]:
        """This worker's device as the current one, for the calls of a step. `torch.cuda.set_device` in
        `init_device` holds for the thread that called it only; a step may run on another (an `AsyncEngine`'s
        loop thread, a caller's thread pool), where the current device is cuda:0: Triton launches its kernels
        and events record on the current device, whatever device the tensors are on."""
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def execute_model(self, request: ExecuteModelRequest | None = None) -> SamplerOutput | None:
        with self.device_context():
            return self._execute_local_step(request)

    def _execute_local_step(self, request: ExecuteModelRequest | None) -> SamplerOutput | None:
        if request is None:
            return None
        assert self.model_runner is not None, "load_model() first"
        self.execute_worker(self.prepare_worker_input(request))
        if request.is_empty:
            return None
        model_input = self.model_runner.prepare_model_input(request)
        output = self.model_runner.execute_model(model_input, self.kv_cache)
        if not isinstance(output, SamplerOutput):
            raise RuntimeError("a single-process worker runs every layer, so it must return a SamplerOutput")
        return output


def resolve_model_runner_cls(spec: Any) -> type[ModelRunnerBase[Any]]:
    """The runner class: the default, a class, or a `"package.module:ClassName"` string."""
    if spec is None:
        return LlamaModelRunner
    if isinstance(spec, str):
        module_name, _, class_name = spec.partition(":")
        if not class_name:
            raise ValueError(f"model_runner_cls={spec!r} must look like 'package.module:ClassName'")
        spec = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(spec, type) and issubclass(spec, ModelRunnerBase)):
        raise TypeError(f"model_runner_cls={spec!r} is not a subclass of ModelRunnerBase")
    return spec


def _as_list(values: tuple[int, ...] | None) -> list[int] | None:
    return list(values) if values is not None else None


def _return_freed_memory() -> None:
    """Hand the heap that loading freed (read buffers, staging copies) back to the OS: glibc keeps it otherwise."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # another C library (musl): nothing to trim
        pass
