"""Token embedding and LM head with the vocabulary split across a tensor-parallel group.

Both hold rows [vocab_start, vocab_end) of a [vocab, hidden] table through a `LinearMethod`. With tied
embeddings one `ParallelLMHead` serves as both (the model uses the same module twice), so the table is
kept once even when it is quantized: lookups read rows back from the LM head's storage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chat_core.checkpoint.tensor_source import TensorSource
from chat_core.layers.linear import LoadsWeightShards
from chat_core.layers.linear_methods import DenseMethod, LinearMethod
from chat_core.parallel import SINGLE_RANK, TensorParallelGroup


class VocabParallelEmbedding(LoadsWeightShards):
    """Each rank holds rows [vocab_start, vocab_end) of the table; the others' rows come from an all-reduce."""

    reads_rows = True  # an embedding only looks rows up, so its method must be able to

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        tp: TensorParallelGroup = SINGLE_RANK,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // tp.size)  # the last rank's slice may be shorter
        self.vocab_start = min(vocab_size, tp.rank * self.rows_per_rank)
        self.vocab_end = min(vocab_size, self.vocab_start + self.rows_per_rank)
        method = method or DenseMethod(dtype, torch.device(device or "cpu"))
        if self.reads_rows and not method.can_read_rows:
            raise ValueError(f"a {method.name} weight cannot be read by rows, so it cannot serve as an embedding")
        self._init_weights(method, self.vocab_end - self.vocab_start, hidden_size, bias=False)

    def _load_weight(self, source: TensorSource, shard: int) -> None:
        self.method.load(self, source, 0, self.vocab_start, self.vocab_end - self.vocab_start, 0)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.method.read_rows(self, token_ids)
        outside = (token_ids < self.vocab_start) | (token_ids >= self.vocab_end)
        local_ids = (token_ids - self.vocab_start).masked_fill(outside, 0)
        embeddings = self.method.read_rows(self, local_ids).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(embeddings)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocabulary slice, gathered into the full vocabulary. Also an embedding
    (`forward`) when the model ties the two, which then gives it a method that can read rows."""

    reads_rows = False

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.method.apply(self, hidden_states)
        if self.tp.size > 1:
            missing = self.rows_per_rank - logits.shape[-1]
            if missing:  # the last rank's shorter slice: every rank must send the same shape
                logits = F.pad(logits, (0, missing))
            logits = self.tp.all_gather(logits, dim=-1)[..., : self.vocab_size]
        return logits
