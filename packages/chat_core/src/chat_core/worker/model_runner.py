"""The default model runner: a Llama-family model over a paged KV cache, on CPU or CUDA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from chat_core.checkpoint.checkpoint import Checkpoint
from chat_core.config import ModelConfig, resolve_dtype
from chat_core.engine.execute_model_request import ExecuteModelRequest
from chat_core.engine_config import EngineConfig
from chat_core.layers.attention import AttentionMetadata
from chat_core.layers.sampler import Sampler, SamplingTensors
from chat_core.models.llama import LlamaForCausalLM
from chat_core.outputs import IntermediateOutput, SamplerOutput
from chat_core.parallel import SINGLE_RANK, PipelineStage, TensorParallelGroup
from chat_core.worker.model_runner_base import ModelInput, ModelRunnerBase


@dataclass(frozen=True)
class LlamaModelInput(ModelInput):
    """One step's tokens, packed: [tokens] tensors for all scheduled sequences, one after another."""

    input_ids: torch.Tensor  # [tokens] int64
    positions: torch.Tensor  # [tokens] int64
    slot_mapping: torch.Tensor  # [tokens] int64: KV-cache slot of each token
    query_start_loc: torch.Tensor  # [sequences + 1] int64: where each sequence's tokens start
    seq_lens: torch.Tensor  # [sequences] int64: tokens in the cache after this step
    block_tables: torch.Tensor  # [sequences, most blocks] int64, padded with 0
    max_query_len: int
    max_seq_len: int
    logits_indices: torch.Tensor  # [sampled] int64: the token whose logits each sampled sequence needs
    sampled_seq_ids: list[int]
    sampling: SamplingTensors | None = None  # None when no sequence samples this step


class LlamaModelRunner(ModelRunnerBase[LlamaModelInput]):
    """Runs `LlamaForCausalLM` for one tensor-parallel rank and pipeline stage.

    Subclasses can change what happens to the logits (`process_logits`) or to the final hidden
    states (`process_hidden_states`) without touching the loop, the worker or the engine.
    """

    def __init__(
        self,
        engine_config: EngineConfig,
        model_config: ModelConfig,
        *,
        device: torch.device,
        tp: TensorParallelGroup = SINGLE_RANK,
        stage: PipelineStage = PipelineStage(),
    ) -> None:
        self.engine_config = engine_config
        self.model_config = model_config
        self.device = device
        self.dtype = resolve_dtype(engine_config.dtype)
        self.tp = tp
        self.stage = stage
        self.block_size = engine_config.block_size
        self.max_model_len = engine_config.resolve_max_model_len(model_config.max_position_embeddings)
        self.is_driver = tp.rank == 0  # the rank of the last stage that samples
        self.sampler = Sampler()
        self.model: LlamaForCausalLM | None = None

    def load_model(self, checkpoint: Checkpoint) -> None:
        self.model = LlamaForCausalLM(
            self.model_config,
            max_positions=self.max_model_len,
            dtype=self.dtype,
            device=self.device,
            tp=self.tp,
            stage=self.stage,
        )
        self.model.load_weights(_with_progress(checkpoint), source=checkpoint.path)
        self.model.eval()

    # The KV cache: per layer [2, num_blocks * block_size, kv_heads_per_rank, head_dim].
    def _kv_shape(self, num_blocks: int) -> tuple[int, ...]:
        assert self.model is not None, "load_model() first"
        return (2, num_blocks * self.block_size, self.model.num_kv_heads_per_rank, self.model_config.head_dim)

    def kv_cache_bytes_per_block(self) -> int:
        assert self.model is not None, "load_model() first"
        per_layer = 2 * self.block_size * self.model.num_kv_heads_per_rank * self.model_config.head_dim
        return per_layer * len(self.model.layers) * self.dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int) -> list[torch.Tensor]:
        assert self.model is not None, "load_model() first"
        shape = self._kv_shape(num_blocks)
        caches = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.model.layers]
        for cache in caches:
            # Padding keys read slot 0, masked out: it must hold finite numbers (0 x NaN is NaN). The
            # rest stays untouched, so memory is only committed as the cache fills.
            cache[:, 0].zero_()
        return caches

    def prepare_model_input(self, request: ExecuteModelRequest) -> LlamaModelInput:
        scheduled = request.scheduled
        block_size = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_start_loc = [0]
        logits_indices: list[int] = []
        for seq in scheduled:
            input_ids.extend(seq.token_ids)
            seq_positions = range(seq.start_position, seq.seq_len)
            positions.extend(seq_positions)
            table = seq.block_table
            slot_mapping.extend(table[p // block_size] * block_size + p % block_size for p in seq_positions)
            query_start_loc.append(query_start_loc[-1] + seq.num_tokens)
            if seq.do_sample:
                logits_indices.append(query_start_loc[-1] - 1)
        sampled = [seq for seq in scheduled if seq.do_sample]
        max_blocks = max((len(seq.block_table) for seq in scheduled), default=0)

        def ints(values: Any) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=self.device)

        # Built on every stage (it is small): whoever prepares the input may not be the stage that samples.
        sampling = SamplingTensors.from_scheduled(sampled, self.model_config.vocab_size, self.device) if sampled else None
        return LlamaModelInput(
            input_ids=ints(input_ids),
            positions=ints(positions),
            slot_mapping=ints(slot_mapping),
            query_start_loc=ints(query_start_loc),
            seq_lens=ints([seq.seq_len for seq in scheduled]),
            block_tables=ints([seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in scheduled]),
            max_query_len=max((seq.num_tokens for seq in scheduled), default=0),
            max_seq_len=max((seq.seq_len for seq in scheduled), default=0),
            logits_indices=ints(logits_indices),
            sampled_seq_ids=[seq.seq_id for seq in sampled],
            sampling=sampling,
        )

    def make_model_input_from_broadcasted_tensor_dict(self, tensor_dict: dict[str, Any]) -> LlamaModelInput:
        return LlamaModelInput.from_broadcasted_tensor_dict(tensor_dict)

    @torch.inference_mode()
    def execute_model(
        self,
        model_input: LlamaModelInput,
        kv_cache: list[torch.Tensor],
        intermediate: IntermediateOutput | None = None,
    ) -> SamplerOutput | IntermediateOutput | None:
        assert self.model is not None, "load_model() first"
        metadata = AttentionMetadata.build(
            query_start_loc=model_input.query_start_loc,
            seq_lens=model_input.seq_lens,
            block_tables=model_input.block_tables,
            slot_mapping=model_input.slot_mapping,
            block_size=self.block_size,
            max_query_len=model_input.max_query_len,
            max_seq_len=model_input.max_seq_len,
            sliding_window=self.model_config.sliding_window,
        )
        out = self.model(model_input.input_ids, model_input.positions, kv_cache, metadata, intermediate)
        if isinstance(out, IntermediateOutput):
            return out
        hidden = self.process_hidden_states(out[model_input.logits_indices], model_input)
        if not model_input.sampled_seq_ids:
            return SamplerOutput(seq_ids=[], sampled_token_ids=torch.empty(0, dtype=torch.int64)) if self.is_driver else None
        logits = self.process_logits(self.model.compute_logits(hidden), model_input)
        if not self.is_driver:
            return None
        assert model_input.sampling is not None
        return self.sampler(logits, model_input.sampled_seq_ids, model_input.sampling)

    def process_hidden_states(self, hidden_states: torch.Tensor, model_input: LlamaModelInput) -> torch.Tensor:
        """Final hidden states of the sampled tokens, before the LM head. Override to inspect or change them."""
        return hidden_states

    def process_logits(self, logits: torch.Tensor, model_input: LlamaModelInput) -> torch.Tensor:
        """Logits [sampled sequences, vocab] before sampling. Override to apply a logits processor."""
        return logits


def _with_progress(checkpoint: Checkpoint) -> Any:
    """The checkpoint's tensors, with a progress bar that appears only if loading takes more than a few seconds."""
    from tqdm.auto import tqdm

    name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
    return tqdm(checkpoint.tensors(), total=checkpoint.num_tensors, desc=f"Loading {name}", unit="tensor", delay=3.0, leave=False)

