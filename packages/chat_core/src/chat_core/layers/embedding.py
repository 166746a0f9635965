"""Token embedding and LM head with the vocabulary split across a tensor-parallel group."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chat_core.checkpoint.tensor_source import TensorSource
from chat_core.layers import cpu_gemm
from chat_core.parallel import SINGLE_RANK, TensorParallelGroup


class VocabParallelEmbedding(nn.Module):
    """Each rank holds rows [vocab_start, vocab_end) of the table; the others' rows come from an all-reduce."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        tp: TensorParallelGroup = SINGLE_RANK,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // tp.size)  # the last rank's slice is padded with zero rows
        self.vocab_start = tp.rank * self.rows_per_rank
        self.vocab_end = min(vocab_size, self.vocab_start + self.rows_per_rank)
        self.weight = nn.Parameter(
            torch.empty(self.rows_per_rank, hidden_size, dtype=dtype, device=device), requires_grad=False
        )

    def load_shard(self, param: nn.Parameter, source: TensorSource, shard: int = 0) -> None:
        rows = self.vocab_end - self.vocab_start
        param.data[rows:].zero_()
        param.data[:rows].copy_(source.read(0, self.vocab_start, rows))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(token_ids, self.weight)
        outside = (token_ids < self.vocab_start) | (token_ids >= self.vocab_end)
        local_ids = (token_ids - self.vocab_start).masked_fill(outside, 0)
        embeddings = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(embeddings)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocabulary slice, gathered into the full vocabulary."""

    packed_weight: torch.Tensor | None = None

    def pack(self) -> None:
        """Pack the (loaded) weight for the CPU GEMM that is fastest for decode batches."""
        self.packed_weight = cpu_gemm.pack_weight(self.weight)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = cpu_gemm.linear(hidden_states, self.weight, self.packed_weight)
        if self.tp.size > 1:
            logits = self.tp.all_gather(logits, dim=-1)[..., : self.vocab_size]
        return logits

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - an LM head is not an embedding
        raise TypeError("ParallelLMHead computes logits with compute_logits(hidden_states)")
