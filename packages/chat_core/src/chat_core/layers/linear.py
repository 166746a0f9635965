"""Linear layers split across a tensor-parallel group; each one knows how to load its own slice.

Column-parallel layers split their output features (each rank computes a slice of the outputs),
row-parallel layers split their input features and sum the partial results with one all-reduce.
How the weight is stored and multiplied (dense, oneDNN-packed, int8, int4) is the layer's
`LinearMethod`; the layer only says which slice of which checkpoint tensor goes where.
"""

from __future__ import annotations

import torch
from torch import nn

from chat_core.checkpoint.tensor_source import TensorSource
from chat_core.layers.linear_methods import DenseMethod, LinearMethod
from chat_core.parallel import SINGLE_RANK, TensorParallelGroup


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what}={numerator} is not divisible by tensor_parallel_size={denominator}")
    return numerator // denominator


class LoadsWeightShards(nn.Module):
    """A layer whose weight arrives as `num_weight_shards` checkpoint tensors (fused q/k/v, gate/up) and is
    finished by its method once the last one is in; an optional bias is a plain float tensor."""

    method: LinearMethod
    num_weight_shards: int = 1

    def _init_weights(self, method: LinearMethod, output_size: int, input_size: int, bias: bool) -> None:
        self.method = method
        method.create_weights(self, output_size, input_size)
        self.bias = nn.Parameter(torch.empty(output_size, dtype=method.dtype, device=method.device), requires_grad=False) if bias else None
        self._weight_shards_loaded: set[int] = set()

    def expected_shards(self) -> set[tuple[str, int]]:
        shards = {("weight", shard) for shard in range(self.num_weight_shards)}
        if self.bias is not None:
            shards |= {("bias", shard) for shard in range(self.num_weight_shards)}
        return shards

    def load_shard(self, name: str, source: TensorSource, shard: int = 0) -> None:
        if name == "bias" and self.bias is not None:
            self._load_bias(source, shard)
            return
        if name != "weight":
            raise KeyError(f"{self.__class__.__name__} has no tensor {name!r}")
        self._load_weight(source, shard)
        self._weight_shards_loaded.add(shard)
        if len(self._weight_shards_loaded) == self.num_weight_shards:
            self.method.finish(self)

    def _load_weight(self, source: TensorSource, shard: int) -> None:
        raise NotImplementedError

    def _load_bias(self, source: TensorSource, shard: int) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return self.method.extra_repr()


class ColumnParallelLinear(LoadsWeightShards):
    """y = x W^T + b with the rows of W (the outputs) split across ranks; no communication."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        *,
        bias: bool = False,
        tp: TensorParallelGroup = SINGLE_RANK,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        # Several logical outputs (q/k/v, gate/up) may be fused into one weight; each is split on its own.
        self.local_sizes = [divide(size, tp.size, "output features") for size in output_sizes]
        self.local_offsets = [sum(self.local_sizes[:i]) for i in range(len(self.local_sizes))]
        self.num_weight_shards = len(output_sizes)
        method = method or DenseMethod(dtype, torch.device(device or "cpu"))
        self._init_weights(method, sum(self.local_sizes), input_size, bias)

    def first_row(self, shard: int) -> int:
        """The row of checkpoint tensor `shard` where this rank's slice starts."""
        return self.tp.rank * self.local_sizes[shard]

    def _load_weight(self, source: TensorSource, shard: int) -> None:
        size = self.local_sizes[shard]
        self.method.load(self, source, 0, self.first_row(shard), size, self.local_offsets[shard])

    def _load_bias(self, source: TensorSource, shard: int) -> None:
        size = self.local_sizes[shard]
        self.bias.data.narrow(0, self.local_offsets[shard], size).copy_(source.read(0, self.first_row(shard), size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x)
        return y if self.bias is None else y + self.bias


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused in one weight; heads split across ranks.

    When there are fewer kv heads than ranks, each rank keeps a copy of the kv head its query heads use.
    """

    SHARDS = {"q": 0, "k": 1, "v": 2}

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        bias: bool = False,
        tp: TensorParallelGroup = SINGLE_RANK,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        method: LinearMethod | None = None,
    ) -> None:
        self.num_local_heads = divide(num_heads, tp.size, "num_attention_heads")
        if num_kv_heads >= tp.size:
            self.num_local_kv_heads = divide(num_kv_heads, tp.size, "num_key_value_heads")
        else:
            divide(tp.size, num_kv_heads, "tensor_parallel_size over num_key_value_heads")  # replicate evenly
            self.num_local_kv_heads = 1
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        sizes = [self.num_local_heads, self.num_local_kv_heads, self.num_local_kv_heads]
        super().__init__(
            hidden_size, [n * head_dim * tp.size for n in sizes], bias=bias, tp=tp, dtype=dtype, device=device, method=method
        )

    def first_row(self, shard: int) -> int:
        if shard == 0:
            first_head = self.tp.rank * self.num_local_heads
        elif self.num_kv_heads >= self.tp.size:
            first_head = self.tp.rank * self.num_local_kv_heads
        else:
            first_head = self.tp.rank * self.num_kv_heads // self.tp.size
        return first_head * self.head_dim


class RowParallelLinear(LoadsWeightShards):
    """y = x W^T + b with the columns of W (the inputs) split across ranks; one all-reduce."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool = False,
        tp: TensorParallelGroup = SINGLE_RANK,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.input_size_per_rank = divide(input_size, tp.size, "input features")
        method = method or DenseMethod(dtype, torch.device(device or "cpu"))
        self._init_weights(method, output_size, self.input_size_per_rank, bias)

    def _load_weight(self, source: TensorSource, shard: int) -> None:
        self.method.load(self, source, 1, self.tp.rank * self.input_size_per_rank, self.input_size_per_rank, 0)

    def _load_bias(self, source: TensorSource, shard: int) -> None:
        self.bias.data.copy_(source.read())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x)
        if self.tp.size > 1:
            y = self.tp.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias  # added once, after the sum of the partial products
        return y
