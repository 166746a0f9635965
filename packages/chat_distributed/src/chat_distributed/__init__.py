"""chat-distributed: tensor- and pipeline-parallel execution for chat-core, on torch.distributed.

`Engine.from_pretrained(model, tensor_parallel_size=2, pipeline_parallel_size=2)` spawns the other
ranks itself; under `torchrun`, rank 0 builds the engine and the other ranks call `run_torchrun_worker`.
"""

from chat_distributed.communication import broadcast_tensor_dict, recv_tensor_dict, send_tensor_dict
from chat_distributed.control_plane import BroadcastControlPlane, ControlPlane, SpmdControlPlane
from chat_distributed.executor import DistributedExecutor, create_distributed_executor
from chat_distributed.processes import WorkerFailedError, WorkerProcesses
from chat_distributed.worker import DistributedWorker, run_torchrun_worker, serve_rank
from chat_distributed.worker_base import LocalOrDistributedWorkerBase

__version__ = "0.1.0"  # the package's only version number: pyproject.toml reads it

__all__ = [
    "BroadcastControlPlane",
    "ControlPlane",
    "DistributedExecutor",
    "DistributedWorker",
    "LocalOrDistributedWorkerBase",
    "SpmdControlPlane",
    "WorkerFailedError",
    "WorkerProcesses",
    "broadcast_tensor_dict",
    "create_distributed_executor",
    "recv_tensor_dict",
    "run_torchrun_worker",
    "send_tensor_dict",
    "serve_rank",
]
