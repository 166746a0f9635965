"""A worker that adds nothing but worker-local logic gets the whole control plane from LocalOrDistributedWorkerBase."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from chat_core import ExecuteModelRequest, ModelInput, ModelRunnerBase, SamplerOutput, SamplingParams, ScheduledSequence, WorkerInput
from chat_distributed import LocalOrDistributedWorkerBase
from chat_distributed.parallel_state import build_parallel_groups, get_world_group
from chat_distributed.testing import RankPool


@dataclass(frozen=True)
class SumInput(ModelInput):
    token_sums: torch.Tensor  # [sequences]
    seq_ids: list[int]


class SumRunner(ModelRunnerBase[SumInput]):
    """A toy 'model': each tensor-parallel rank contributes (rank + 1) x the sum of the fed tokens."""

    def __init__(self, tp: Any) -> None:
        self.tp = tp
        self.received: list[tuple[list[int], list[int]]] = []

    def load_model(self, checkpoint: Any) -> None:
        pass

    def allocate_kv_cache(self, num_blocks: int) -> list[torch.Tensor]:
        return []

    def kv_cache_bytes_per_block(self) -> int:
        return 1

    def prepare_model_input(self, request: ExecuteModelRequest) -> SumInput:
        return SumInput(torch.tensor([sum(s.token_ids) for s in request.scheduled]), [s.seq_id for s in request.scheduled])

    def make_model_input_from_broadcasted_tensor_dict(self, tensor_dict: dict[str, Any]) -> SumInput:
        return SumInput.from_broadcasted_tensor_dict(tensor_dict)

    def execute_model(self, model_input: SumInput, kv_cache: list[torch.Tensor], intermediate: Any = None) -> SamplerOutput | None:
        self.received.append((model_input.token_sums.tolist(), list(model_input.seq_ids)))
        total = self.tp.all_reduce(model_input.token_sums * (self.tp.rank + 1))
        return SamplerOutput(model_input.seq_ids, total % 1000) if self.tp.rank == 0 else None


class SumWorker(LocalOrDistributedWorkerBase):
    """Only local logic: devices, a runner, and what to do with finished sequences."""

    def __init__(self, control_plane: str) -> None:
        super().__init__(control_plane)
        self.finished: list[int] = []

    def init_device(self) -> None:
        self.groups = build_parallel_groups(get_world_group().size, 1, torch.device("cpu"))

    def load_model(self) -> None:
        self.model_runner = SumRunner(self.groups.tp)

    def determine_num_available_blocks(self) -> int:
        return 1

    def initialize_cache(self, num_blocks: int) -> None:
        self.kv_cache = []

    def prepare_worker_input(self, request: ExecuteModelRequest) -> WorkerInput:
        return WorkerInput(num_seqs=len(request.scheduled), finished_seq_ids=list(request.finished_seq_ids))

    def execute_worker(self, worker_input: WorkerInput) -> None:
        self.finished.extend(worker_input.finished_seq_ids)


_WORKER: dict[str, SumWorker] = {}


def _start(control_plane: str) -> None:
    worker = SumWorker(control_plane)
    worker.init_device()
    worker.load_model()
    worker.initialize_cache(worker.determine_num_available_blocks())
    _WORKER["w"] = worker


def _drive(requests: list[ExecuteModelRequest]) -> list[list[int]]:
    worker = _WORKER["w"]
    tokens = [worker.execute_model(request).sampled_token_ids.tolist() for request in requests]
    worker.stop_worker_execution_loop()
    return tokens


def _serve() -> tuple[list[Any], list[int]]:
    worker = _WORKER["w"]
    worker.start_worker_execution_loop()
    return worker.model_runner.received, worker.finished


def scheduled(seq_id: int, tokens: list[int], start: int) -> ScheduledSequence:
    return ScheduledSequence(seq_id, tokens, start, [seq_id], SamplingParams(temperature=0), do_sample=True)


REQUESTS = [
    ExecuteModelRequest([scheduled(0, [5, 6, 7], 0), scheduled(1, [100], 0)]),
    ExecuteModelRequest([scheduled(0, [8], 3), scheduled(1, [9], 1)]),
    ExecuteModelRequest([scheduled(1, [10], 2)], finished_seq_ids=[0]),
]


@pytest.fixture(scope="module")
def pool():
    with RankPool(2, timeout=30.0) as pool:
        yield pool


@pytest.mark.parametrize("control_plane", ["broadcast", "spmd"])
def test_a_local_only_worker_runs_distributed_with_either_control_plane(pool, control_plane):
    pool.run(_start, control_plane)
    results = pool.run_each({0: (_drive, REQUESTS), 1: (_serve,)})
    # The toy model's answer needs both ranks: (1 + 2) x the sum of the fed tokens.
    assert results[0] == [[54, 300], [24, 27], [30]]
    received, finished = results[1]
    assert received == [([18, 100], [0, 1]), ([8, 9], [0, 1]), ([10], [1])]
    assert finished == [0]
