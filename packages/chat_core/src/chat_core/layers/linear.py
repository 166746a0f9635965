"""Linear layers split across a tensor-parallel group; each one knows how to load its own slice.

Column-parallel layers split their output features (each rank computes a slice of the outputs),
row-parallel layers split their input features and sum the partial results with one all-reduce.
With a group of one they are plain matrix products (see cpu_gemm for the CPU fast path).
"""

from __future__ import annotations

import torch
from torch import nn

from chat_core.checkpoint.tensor_source import TensorSource
from chat_core.layers import cpu_gemm
from chat_core.parallel import SINGLE_RANK, TensorParallelGroup


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what}={numerator} is not divisible by tensor_parallel_size={denominator}")
    return numerator // denominator


def _empty_parameter(*shape: int, dtype: torch.dtype, device: torch.device | str | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class ColumnParallelLinear(nn.Module):
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
    ) -> None:
        super().__init__()
        self.tp = tp
        # Several logical outputs (q/k/v, gate/up) may be fused into one weight; each is split on its own.
        self.local_sizes = [divide(size, tp.size, "output features") for size in output_sizes]
        self.local_offsets = [sum(self.local_sizes[:i]) for i in range(len(self.local_sizes))]
        self.weight = _empty_parameter(sum(self.local_sizes), input_size, dtype=dtype, device=device)
        self.bias = _empty_parameter(sum(self.local_sizes), dtype=dtype, device=device) if bias else None
        self.packed_weight: torch.Tensor | None = None

    def load_shard(self, param: nn.Parameter, source: TensorSource, shard: int = 0) -> None:
        """Copy this rank's slice of logical output `shard` from the checkpoint into `param`."""
        self._load_rows(param, source, shard, self.tp.rank * self.local_sizes[shard])

    def _load_rows(self, param: nn.Parameter, source: TensorSource, shard: int, start_row: int) -> None:
        size = self.local_sizes[shard]
        loaded = source.read(0, start_row, size)
        param.data.narrow(0, self.local_offsets[shard], size).copy_(loaded)

    def pack(self) -> None:
        """Keep a oneDNN-packed copy of the loaded weight (see cpu_gemm: faster in bfloat16)."""
        self.packed_weight = cpu_gemm.pack_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu_gemm.linear(x, self.weight, self.packed_weight)
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
        super().__init__(hidden_size, [n * head_dim * tp.size for n in sizes], bias=bias, tp=tp, dtype=dtype, device=device)

    def load_shard(self, param: nn.Parameter, source: TensorSource, shard: int = 0) -> None:
        if shard == 0:
            first_head = self.tp.rank * self.num_local_heads
        elif self.num_kv_heads >= self.tp.size:
            first_head = self.tp.rank * self.num_local_kv_heads
        else:
            first_head = self.tp.rank * self.num_kv_heads // self.tp.size
        self._load_rows(param, source, shard, first_head * self.head_dim)


class RowParallelLinear(nn.Module):
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
    ) -> None:
        super().__init__()
        self.tp = tp
        self.input_size_per_rank = divide(input_size, tp.size, "input features")
        self.weight = _empty_parameter(output_size, self.input_size_per_rank, dtype=dtype, device=device)
        self.bias = _empty_parameter(output_size, dtype=dtype, device=device) if bias else None
        self.packed_weight: torch.Tensor | None = None

    def load_shard(self, param: nn.Parameter, source: TensorSource, shard: int = 0) -> None:
        if param is self.bias:
            param.data.copy_(source.read())
            return
        start = self.tp.rank * self.input_size_per_rank
        param.data.copy_(source.read(1, start, self.input_size_per_rank))

    pack = ColumnParallelLinear.pack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu_gemm.linear(x, self.weight, self.packed_weight)
        if self.tp.size > 1:
            y = self.tp.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias  # added once, after the sum of the partial products
        return y
