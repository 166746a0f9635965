"""The process groups of one distributed run: the world, and each rank's tensor- and pipeline-parallel group.

Ranks are laid out `rank = pp_rank * tensor_parallel_size + tp_rank`: each pipeline stage is a contiguous
block of tensor-parallel ranks, so on one node a stage's all-reduces stay on neighbouring devices.
Every group has a gloo `cpu_group` for pickled metadata and a `device_group` for tensors (the same gloo
group when the device is the CPU, NCCL on CUDA). This module owns all of them; nothing else calls
`torch.distributed.new_group`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
# How long a rank waits for rank 0's next step: an idle engine is not a failed one. (A dead rank 0
# closes its sockets, which ends the wait at once; a vanished launcher is caught by the rank's watchdog.)
IDLE_TIMEOUT = timedelta(days=365)

# torch >= 2.10 renamed all_gather_into_tensor; the old name warns there but is the only one before.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True, eq=False)
class GroupCoordinator:
    """One process group, seen from one of its members; implements chat_core's `TensorParallelGroup`.

    `ranks` are global ranks in group order; `rank` (the protocol's name) is this process's index in
    them, `global_rank` its rank in the world. `first_rank`, `next_rank`, ... are global ranks, ready
    for `torch.distributed` calls.
    """

    ranks: tuple[int, ...]
    global_rank: int
    cpu_group: dist.ProcessGroup
    device_group: dist.ProcessGroup
    device: torch.device

    def __post_init__(self) -> None:
        if self.global_rank not in self.ranks:
            raise ValueError(f"global rank {self.global_rank} is not in the group's ranks {list(self.ranks)}")

    @property
    def rank_in_group(self) -> int:
        return self.ranks.index(self.global_rank)

    @property
    def rank(self) -> int:
        return self.rank_in_group

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def is_first(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last(self) -> bool:
        return self.rank_in_group == self.size - 1

    @property
    def first_rank(self) -> int:
        return self.ranks[0]

    @property
    def last_rank(self) -> int:
        return self.ranks[-1]

    @property
    def next_rank(self) -> int:
        """The global rank after this one; wraps around, as a last stage may hand back to the first."""
        return self.ranks[(self.rank_in_group + 1) % self.size]

    @property
    def prev_rank(self) -> int:
        """The global rank before this one; wraps around like `next_rank`."""
        return self.ranks[(self.rank_in_group - 1) % self.size]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the group, in place; returns it."""
        if self.size == 1:
            return tensor
        dist.all_reduce(tensor, group=self.device_group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `tensor` (same shape on all) along `dim`, in rank order."""
        if self.size == 1:
            return tensor
        if tensor.dim() == 0:
            raise ValueError("all_gather needs a tensor with at least one dimension, got a 0-d tensor")
        dim = dim % tensor.dim()
        # Gathering along dim 0 into one buffer is a single collective; other dims are a movedim away.
        # gloo wants the output as [size * d0, ...]; viewed as [size, d0, ...] it is the same buffer.
        gathered = torch.empty((self.size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        _all_gather_single(gathered, tensor.contiguous(), group=self.device_group)
        gathered = gathered.view(self.size, *tensor.shape)
        shape = (*tensor.shape[:dim], self.size * tensor.shape[dim], *tensor.shape[dim + 1 :])
        return gathered.movedim(0, dim).reshape(shape)


@dataclass(frozen=True, eq=False)
class ParallelGroups:
    """This rank's view of the world: its tensor-parallel group and its pipeline group.

    `control` is the world again, for the control plane only: on ranks other than 0 its CPU group waits
    `IDLE_TIMEOUT` for the first message of a step, while every collective inside a step keeps the
    groups' timeout."""

    world: GroupCoordinator
    tp: GroupCoordinator
    pp: GroupCoordinator
    control: GroupCoordinator

    @property
    def rank(self) -> int:
        return self.world.global_rank

    @property
    def world_size(self) -> int:
        return self.world.size

    @property
    def tensor_parallel_size(self) -> int:
        return self.tp.size

    @property
    def pipeline_parallel_size(self) -> int:
        return self.pp.size


@dataclass
class _State:
    backend: str
    timeout: timedelta
    world: GroupCoordinator


_state: _State | None = None


def init_distributed(
    *,
    rank: int,
    world_size: int,
    init_method: str | None = None,
    backend: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Join the world: initialise the default process group (unless already done) and its CPU group.

    `init_method`: `"env://"` under torchrun (the default when MASTER_ADDR is set), `"tcp://host:port"`,
    or `"file:///path"` for processes spawned from one script (no port to choose). `backend` defaults to
    "nccl" when CUDA is available, else "gloo". `timeout` (seconds) bounds rendezvous and every
    collective, so a dead or hung rank turns into an error instead of a hang.
    Collective: every rank must call it.
    """
    global _state
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size) with world_size >= 1, got world_size={world_size}")
    if timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    if not dist.is_available():
        raise RuntimeError("this build of torch has no torch.distributed; chat-distributed needs it")
    if _state is not None:
        _check_same_world(rank, world_size)
        return
    if dist.is_initialized():
        # Someone (a launcher, a test) initialised the default group; join it as it is.
        _check_same_world(rank, world_size)
        backend = dist.get_backend()
        device = _default_device(backend, rank)
    else:
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if init_method is None:
            if "MASTER_ADDR" not in os.environ:
                raise ValueError(
                    "init_method is None and MASTER_ADDR is not set: pass init_method='tcp://host:port' or "
                    "'file:///path', or start the processes with torchrun"
                )
            init_method = "env://"
        device = _default_device(backend, rank)  # before init, so NCCL binds this rank's GPU
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
    pg_timeout = timedelta(seconds=timeout)
    world_group = dist.group.WORLD
    assert world_group is not None  # set by init_process_group
    cpu_group = world_group if backend == "gloo" else dist.new_group(backend="gloo", timeout=pg_timeout)
    world = GroupCoordinator(tuple(range(world_size)), rank, cpu_group, world_group, device)
    _state = _State(backend=backend, timeout=pg_timeout, world=world)


def _check_same_world(rank: int, world_size: int) -> None:
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise RuntimeError(
            f"torch.distributed is already initialised as rank {dist.get_rank()} of {dist.get_world_size()}, "
            f"but init_distributed was asked for rank {rank} of {world_size}"
        )


def _default_device(backend: str, rank: int) -> torch.device:
    if "nccl" not in backend:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"backend {backend!r} needs CUDA, but torch.cuda.is_available() is False; use backend='gloo'")
    # torchrun sets LOCAL_RANK; spawned processes on one node use their rank modulo the visible GPUs.
    index = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def is_initialized() -> bool:
    """Whether `init_distributed` has run in this process (and `destroy_distributed` has not)."""
    return _state is not None


def get_world_group() -> GroupCoordinator:
    """The whole world, on the device `init_distributed` chose."""
    return _require_state().world


def _require_state() -> _State:
    if _state is None:
        raise RuntimeError("torch.distributed groups are not set up: call chat_distributed.init_distributed first")
    return _state


def new_group_coordinator(group_ranks: Sequence[Sequence[int]], device: torch.device) -> GroupCoordinator:
    """Create one process group per entry of `group_ranks` and return the one this rank belongs to.

    `group_ranks` must partition the world (each rank in exactly one group), e.g. `[[0, 2], [1]]`.
    Collective: every rank must call it with the same `group_ranks`, because
    `torch.distributed.new_group` must be entered by all ranks in the same order.
    """
    state = _require_state()
    groups = [tuple(int(rank) for rank in ranks) for ranks in group_ranks]
    # The check depends only on the arguments, so every rank fails alike instead of some entering new_group.
    if sorted(rank for ranks in groups for rank in ranks) != list(range(state.world.size)):
        raise ValueError(
            f"group_ranks={[list(ranks) for ranks in groups]} must hold each rank of the world of "
            f"{state.world.size} exactly once"
        )
    device_backend = _device_backend(device)
    me = state.world.global_rank
    coordinator: GroupCoordinator | None = None
    for ranks in groups:
        cpu_group = dist.new_group(list(ranks), backend="gloo", timeout=state.timeout)
        # A second gloo group for CPU tensors would only add sockets: share the one.
        device_group = (
            cpu_group
            if device_backend == "gloo"
            else dist.new_group(list(ranks), backend=device_backend, timeout=state.timeout)
        )
        if me in ranks:
            coordinator = GroupCoordinator(ranks, me, cpu_group, device_group, device)
    assert coordinator is not None  # the partition check put this rank in one group
    return coordinator


def _device_backend(device: torch.device) -> str:
    if device.type == "cpu":
        return "gloo"
    if device.type == "cuda":
        return "nccl"
    raise ValueError(f"device {device} is not supported for process groups; expected a cpu or cuda device")


def build_parallel_groups(tensor_parallel_size: int, pipeline_parallel_size: int, device: torch.device) -> ParallelGroups:
    """Split the world into tensor-parallel groups (contiguous ranks) and pipeline groups (strided ranks).

    Collective: every rank must call it with the same sizes.
    """
    state = _require_state()
    world_size = state.world.size
    if tensor_parallel_size < 1 or pipeline_parallel_size < 1:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} and pipeline_parallel_size={pipeline_parallel_size} "
            "must both be at least 1"
        )
    if tensor_parallel_size * pipeline_parallel_size != world_size:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} x pipeline_parallel_size={pipeline_parallel_size} "
            f"must equal the world size {world_size}"
        )
    tp_ranks = [
        [stage * tensor_parallel_size + tp_rank for tp_rank in range(tensor_parallel_size)]
        for stage in range(pipeline_parallel_size)
    ]
    pp_ranks = [
        [stage * tensor_parallel_size + tp_rank for stage in range(pipeline_parallel_size)]
        for tp_rank in range(tensor_parallel_size)
    ]
    tp = new_group_coordinator(tp_ranks, device)
    pp = new_group_coordinator(pp_ranks, device)
    world = state.world
    if world.device != device:
        world = new_group_coordinator([list(range(world_size))], device)
    # A group's timeout is each member's own: rank 0 only sends here and must not wait past the timeout
    # on a stopped rank, while the others may wait for its next step for as long as the engine is idle.
    idle_timeout = state.timeout if world.global_rank == 0 else IDLE_TIMEOUT
    idle_cpu_group = dist.new_group(list(range(world_size)), backend="gloo", timeout=idle_timeout)
    control = GroupCoordinator(world.ranks, world.global_rank, idle_cpu_group, world.device_group, device)
    return ParallelGroups(world=world, tp=tp, pp=pp, control=control)


def destroy_distributed() -> None:
    """Destroy every process group this process holds, the default one included. Safe to call twice."""
    global _state
    _state = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
