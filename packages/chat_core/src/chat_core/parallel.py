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


class RankOrderedSums:
    """`group`, with an all-reduce that adds the ranks' tensors in rank order whatever their size: an
    all-gather, then ((r0 + r1) + r2) ... here. A collective's own reduction order may depend on the tensor's
    size (gloo's ring all-reduce cuts it into one chunk per rank, each summed starting from another rank), so
    float32 partial sums of a row would get other bits in another batch; `batch_invariant` needs these."""

    def __init__(self, group: TensorParallelGroup) -> None:
        self.group = group

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def size(self) -> int:
        return self.group.size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return tensor
        ranks = self.group.all_gather(tensor.unsqueeze(0), dim=0)
        total = ranks[0]
        for rank in range(1, self.group.size):
            total = total + ranks[rank]
        return total

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return self.group.all_gather(tensor, dim)


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


def check_tensor_parallel_size(size: int, num_heads: int, num_kv_heads: int, intermediate_size: int) -> None:
    """Whether a model's attention heads and MLP split evenly over `size` ranks (kv heads split, or are replicated
    when fewer than the ranks); checked before any rank starts, with the sizes that would work."""

    def fits(ranks: int) -> bool:
        kv_fit = num_kv_heads % ranks == 0 or ranks % num_kv_heads == 0
        return num_heads % ranks == 0 and intermediate_size % ranks == 0 and kv_fit

    if size < 1 or not fits(size):
        sizes = [ranks for ranks in range(1, num_heads + 1) if fits(ranks)]
        raise ValueError(
            f"tensor_parallel_size={size} does not split this model evenly ({num_heads} attention heads, {num_kv_heads} "
            f"key/value heads, MLP of {intermediate_size}): use one of {', '.join(map(str, sizes))}"
        )
