"""What a model needs to know about parallelism, without depending on any process group.

`chat_core` builds models for one rank of a tensor-parallel group and one stage of a pipeline; the
collectives a tensor-parallel model needs (all-reduce, all-gather) go through a `TensorParallelGroup`.
Locally that is `SINGLE_RANK`, which does nothing; `chat_distributed` supplies one backed by
`torch.distributed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TensorParallelGroup(Protocol):
    """The collectives of one tensor-parallel group, as the model layers use them."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the group; returns the summed tensor (may be `tensor` itself, reduced in place)."""
        ...

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `tensor` along `dim`, in rank order."""
        ...


class SingleRank:
    """The group of one: every collective is the identity."""

    rank = 0
    size = 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return tensor


SINGLE_RANK = SingleRank()


@dataclass(frozen=True)
class PipelineStage:
    """Which part of the layer stack this rank runs: layers [start_layer, end_layer) of `num_layers`."""

    rank: int = 0
    size: int = 1
    start_layer: int = 0
    end_layer: int | None = None

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1


def split_layers(num_layers: int, num_stages: int, layers_per_stage: list[int] | None = None) -> list[tuple[int, int]]:
    """The [start, end) layer range of each pipeline stage: even by default, or as `layers_per_stage` says."""
    if num_stages < 1:
        raise ValueError(f"pipeline_parallel_size must be at least 1, got {num_stages}")
    if num_stages > num_layers:
        raise ValueError(f"pipeline_parallel_size={num_stages} is more than the model's {num_layers} layers")
    if layers_per_stage is None:
        base, extra = divmod(num_layers, num_stages)
        # Later stages also run the final norm and LM head, so earlier ones take the extra layers.
        layers_per_stage = [base + (1 if stage < extra else 0) for stage in range(num_stages)]
    if len(layers_per_stage) != num_stages or sum(layers_per_stage) != num_layers or min(layers_per_stage) < 1:
        raise ValueError(
            f"layers_per_stage={layers_per_stage} must give each of the {num_stages} stages at least one layer "
            f"and sum to the model's {num_layers} layers"
        )
    ranges, start = [], 0
    for count in layers_per_stage:
        ranges.append((start, start + count))
        start += count
    return ranges
