"""The distributed worker for chat_core's Llama-family runner: chat_core's local steps, this package's control plane."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from chat_core.checkpoint.checkpoint import Checkpoint
from chat_core.engine.execute_model_request import ExecuteModelRequest
from chat_core.engine_config import EngineConfig
from chat_core.outputs import SamplerOutput
from chat_core.worker.worker import Worker

from chat_distributed.parallel_state import build_parallel_groups, destroy_distributed, init_distributed
from chat_distributed.status_board import ALLOCATING, JOINING, LOADING, SERVING, STOPPED
from chat_distributed.worker_base import LocalOrDistributedWorkerBase


class DistributedWorker(LocalOrDistributedWorkerBase, Worker):
    """One rank. `execute_model` comes from LocalOrDistributedWorkerBase; everything local from `Worker`."""

    # The worker-local steps, taken from chat_core's Worker (the base class declares them abstract).
    prepare_worker_input = Worker.prepare_worker_input
    execute_worker = Worker.execute_worker

    def __init__(
        self,
        engine_config: EngineConfig,
        *,
        rank: int,
        init_method: str | None,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        Worker.__init__(self, engine_config, checkpoint=checkpoint)
        LocalOrDistributedWorkerBase.__init__(self, engine_config.control_plane)
        self.rank = rank
        self.init_method = init_method

    def init_device(self) -> None:
        config = self.engine_config
        use_cuda = torch.device(config.device).type == "cuda"
        init_distributed(
            rank=self.rank,
            world_size=config.world_size,
            init_method=self.init_method,
            backend="nccl" if use_cuda else "gloo",
            timeout=config.distributed_timeout_s,
        )
        if use_cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", self.rank % torch.cuda.device_count()))
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            # Ranks on one machine share its cores: don't let each one spawn a thread per core.
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", config.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        self.groups = build_parallel_groups(config.tensor_parallel_size, config.pipeline_parallel_size, self.device)
        self.tp = self.groups.tp
        self.pipeline_rank = self.groups.pp.rank_in_group
        torch.manual_seed(config.seed)

    def execute_model(self, request: ExecuteModelRequest | None = None) -> SamplerOutput | None:
        with self.device_context():  # rank 0's steps may come from another thread than init_device's
            return LocalOrDistributedWorkerBase.execute_model(self, request)

    def determine_num_available_blocks(self) -> int:
        """The smallest number of blocks any rank can hold: block ids mean the same on every rank."""
        local = torch.tensor([Worker.determine_num_available_blocks(self)], dtype=torch.int64)
        dist.all_reduce(local, op=dist.ReduceOp.MIN, group=self.groups.world.cpu_group)
        return int(local.item())


def serve_rank(
    config: EngineConfig,
    *,
    rank: int,
    init_method: str | None,
    on_phase: Callable[[int], None] | None = None,
    on_step: Callable[[], None] | None = None,
    checkpoint: Checkpoint | None = None,
) -> None:
    """The life of a rank other than 0: join, load its weights, allocate its cache, run steps until told to stop.

    `on_phase` is told each phase as it begins (`status_board`'s JOINING ... STOPPED), `on_step` each step
    served: the launcher's status board, so that a failure can name where a rank stood."""
    if rank == 0:
        raise ValueError("rank 0 runs the engine (DistributedExecutor), not the worker loop")
    report = on_phase or (lambda phase: None)
    worker = DistributedWorker(config, rank=rank, init_method=init_method, checkpoint=checkpoint)
    try:
        report(JOINING)
        worker.init_device()
        report(LOADING)
        worker.load_model()
        report(ALLOCATING)
        worker.initialize_cache(worker.determine_num_available_blocks())
        report(SERVING)
        worker.start_worker_execution_loop(on_step=on_step)
        report(STOPPED)
    finally:
        destroy_distributed()


def run_torchrun_worker(config: EngineConfig, checkpoint: Checkpoint | None = None) -> None:
    """What a rank other than 0 runs under torchrun: the same command as rank 0, serving its steps (from
    `checkpoint` if it was opened already)."""
    serve_rank(config, rank=int(os.environ["RANK"]), init_method="env://", checkpoint=checkpoint)
