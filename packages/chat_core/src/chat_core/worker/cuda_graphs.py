"""Decode steps replayed from CUDA graphs, one captured per batch-size bucket (1, 2, 4, ... max_num_seqs).

A decode step launches a few hundred small kernels; replaying them as one graph removes the launch
overhead that otherwise leaves the GPU idle. The graphs read their inputs from static buffers: a step is
copied into them, padded up to its bucket (padding rows write their keys into the runner's scratch block
and attend to one key there, so they never touch a real sequence), the graph replays, and the real rows
of its output are returned. The model forward up to the final hidden states is in the graph; the LM head,
the runner's hooks (`process_hidden_states`, `process_logits`) and the sampler run eagerly after it, so
subclasses keep working. A tensor-parallel all-reduce (NCCL) is captured with the rest.

With `capture=False` (any device) the same static buffers, padding and buckets run eagerly: that is how
the test suite checks them on a machine without a GPU (with the Triton kernel under its interpreter).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from chat_core.layers.attention import TritonDecodeMetadata

if TYPE_CHECKING:
    from chat_core.worker.model_runner import LlamaModelInput, LlamaModelRunner


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, ... up to and including `max_num_seqs`."""
    buckets, size = [], 1
    while size < max_num_seqs:
        buckets.append(size)
        size *= 2
    return [*buckets, max_num_seqs]


class CudaGraphDecoder:
    def __init__(self, runner: LlamaModelRunner, kv_caches: list[torch.Tensor], *, capture: bool = True) -> None:
        assert runner.model is not None
        self.capture = capture
        model, device, block_size = runner.model, runner.device, runner.block_size
        self.buckets = batch_buckets(runner.engine_config.max_num_seqs)
        self.max_blocks = -(-runner.max_model_len // block_size)
        self.scratch_block = runner.scratch_block
        self.scratch_slot = runner.scratch_block * block_size
        max_seqs = self.buckets[-1]
        self.input_ids = torch.zeros(max_seqs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_seqs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_seqs,), self.scratch_slot, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_seqs, dtype=torch.int64, device=device)
        self.block_tables = torch.full((max_seqs, self.max_blocks), self.scratch_block, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.forwards: dict[int, Callable[[], torch.Tensor]] = {}
        pool = None
        with torch.inference_mode():
            for bucket in reversed(self.buckets):  # largest first: the smaller ones reuse its memory pool
                metadata = TritonDecodeMetadata(
                    self.slot_mapping[:bucket],
                    self.seq_lens[:bucket],
                    self.block_tables[:bucket],
                    block_size,
                    runner.model_config.sliding_window,
                )

                def forward(bucket: int = bucket, metadata: TritonDecodeMetadata = metadata) -> torch.Tensor:
                    return model(self.input_ids[:bucket], self.positions[:bucket], kv_caches, metadata)

                self.forwards[bucket] = forward
                if not capture:
                    continue
                forward()  # warm-up outside the graph: kernels compiled, workspaces allocated
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bucket] = forward()
                pool = graph.pool()
                self.graphs[bucket] = graph

    def can_run(self, model_input: LlamaModelInput) -> bool:
        """A pure decode step (one new token per sequence) that fits the largest bucket."""
        batch = model_input.seq_lens.shape[0]
        return (
            model_input.max_query_len == 1
            and model_input.input_ids.shape[0] == batch
            and 0 < batch <= self.buckets[-1]
            and model_input.block_tables.shape[1] <= self.max_blocks
        )

    def run(self, model_input: LlamaModelInput) -> torch.Tensor:
        """The final hidden states of the step's rows, [batch, hidden] (a view valid until the next replay)."""
        batch = model_input.seq_lens.shape[0]
        bucket = next(b for b in self.buckets if b >= batch)
        width = model_input.block_tables.shape[1]
        self.input_ids[:batch].copy_(model_input.input_ids, non_blocking=True)
        self.positions[:batch].copy_(model_input.positions, non_blocking=True)
        self.slot_mapping[:batch].copy_(model_input.slot_mapping, non_blocking=True)
        self.seq_lens[:batch].copy_(model_input.seq_lens, non_blocking=True)
        self.block_tables[:bucket].fill_(self.scratch_block)
        self.block_tables[:batch, :width].copy_(model_input.block_tables, non_blocking=True)
        # Padding rows (left over from a bigger step) go back to the scratch block.
        self.slot_mapping[batch:bucket].fill_(self.scratch_slot)
        self.seq_lens[batch:bucket].fill_(1)
        if not self.capture:
            return self.forwards[bucket]()[:batch]
        self.graphs[bucket].replay()
        return self.outputs[bucket][:batch]
