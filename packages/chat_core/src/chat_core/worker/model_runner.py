"""The default model runner: a Llama-family model over a paged KV cache, on CPU or CUDA."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from chat_core.checkpoint.checkpoint import Checkpoint
from chat_core.config import ModelConfig, resolve_dtype
from chat_core.engine.execute_model_request import ExecuteModelRequest
from chat_core.engine_config import EngineConfig
from chat_core.layers.attention import AttentionMetadata, triton_supports
from chat_core.layers.sampler import Sampler, SamplingTensors
from chat_core.models.llama import LlamaForCausalLM
from chat_core.outputs import IntermediateOutput, SamplerOutput
from chat_core.parallel import SINGLE_RANK, PipelineStage, RankOrderedSums, TensorParallelGroup
from chat_core.quantization import DEFAULT_INT4_GROUP_SIZE, QuantizationPlan
from chat_core.worker.compiled_decode import CompiledDecoder
from chat_core.worker.cuda_graphs import CudaGraphDecoder
from chat_core.worker.input_staging import InputStaging
from chat_core.worker.model_runner_base import ModelInput, ModelRunnerBase
from chat_core.worker.native_decode import NativeDecoder


@dataclass(frozen=True)
class LlamaModelInput(ModelInput):
    """One step's tokens, packed: [tokens] tensors for all scheduled sequences, one after another."""

    input_ids: torch.Tensor  # [tokens] int64
    positions: torch.Tensor  # [tokens] int64
    slot_mapping: torch.Tensor  # [tokens] int64: KV-cache slot of each token
    query_start_loc: torch.Tensor  # [sequences + 1] int64: where each sequence's tokens start
    seq_lens: torch.Tensor  # [sequences] int64: tokens in the cache after this step
    block_tables: torch.Tensor  # [sequences, most blocks] int64, padded with the runner's scratch block
    max_query_len: int
    max_seq_len: int
    logits_indices: torch.Tensor  # [sampled] int64: the token whose logits each sampled sequence needs
    sampled_seq_ids: list[int]
    sampling: SamplingTensors | None = None  # None when no sequence samples this step
    # Steps with a prefill only: each sequence's new tokens and tokens cached after the step, on the host, from
    # which attention decides whether to split the step (`attention_groups`) without reading the device.
    host_query_lens: list[int] | None = None
    host_seq_lens: list[int] | None = None


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
        self.kv_cache_dtype = engine_config.resolve_kv_cache_dtype()
        # Batch invariance under tensor parallel: the all-reduce must add ranks in an order that is always the same.
        self.tp = RankOrderedSums(tp) if engine_config.batch_invariant and tp.size > 1 else tp
        self.stage = stage
        self.block_size = engine_config.block_size
        self.max_model_len = engine_config.resolve_max_model_len(model_config.max_position_embeddings)
        self.is_driver = tp.rank == 0  # the rank of the last stage that samples
        self.sampler = Sampler()
        self.staging = InputStaging(device)
        self.model: LlamaForCausalLM | None = None
        self.scratch_block = 0  # set by allocate_kv_cache
        self.decode_graphs: CudaGraphDecoder | None = None
        self.compiled_decode: CompiledDecoder | None = None
        self.native_decode: NativeDecoder | None = None

    def load_model(self, checkpoint: Checkpoint) -> None:
        config = self.engine_config
        plan = QuantizationPlan(
            mode=config.quantization,
            dtype=self.dtype,
            compute_dtype=None if config.quantization_compute_dtype == "auto" else resolve_dtype(config.quantization_compute_dtype),
            device=self.device,
            group_size=config.quantization_group_size or DEFAULT_INT4_GROUP_SIZE,
            tensor_formats=checkpoint.tensor_formats(),
            batch_invariant=config.batch_invariant,
        )
        self.model = LlamaForCausalLM(
            self.model_config, max_positions=self.max_model_len, tp=self.tp, stage=self.stage, quantization=plan
        )
        self.model.load_weights(_with_progress(checkpoint), source=checkpoint.path)
        self.model.eval()

    # The KV cache: per layer [2, (num_blocks + 1) * block_size, kv_heads_per_rank, head_dim]. Block
    # `num_blocks` is this runner's own scratch block, never handed out: padding rows of a step write their
    # keys there and padded block-table entries point at it, so a real sequence's cache is never touched.
    def kv_cache_bytes_per_block(self) -> int:
        assert self.model is not None, "load_model() first"
        per_layer = 2 * self.block_size * self.model.num_kv_heads_per_rank * self.model_config.head_dim
        return per_layer * len(self.model.layers) * self.kv_cache_dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int) -> list[torch.Tensor]:
        assert self.model is not None, "load_model() first"
        self.scratch_block = num_blocks
        shape = (2, (num_blocks + 1) * self.block_size, self.model.num_kv_heads_per_rank, self.model_config.head_dim)
        caches = [torch.empty(shape, dtype=self.kv_cache_dtype, device=self.device) for _ in self.model.layers]
        for cache in caches:
            # Padded reads land in the scratch block, masked out: it must hold finite numbers (0 x NaN is NaN).
            # The rest stays untouched, so memory is only committed as the cache fills.
            cache[:, num_blocks * self.block_size :].zero_()
        if self.cuda_graphs_enabled:
            self.decode_graphs = CudaGraphDecoder(self, caches, capture=self.device.type == "cuda")
        if self.compiled_decode_enabled:
            self.compiled_decode = CompiledDecoder(self, caches)
            self.compiled_decode.warm_up()
        elif self.native_decode_enabled:
            self.native_decode = NativeDecoder.for_runner(self, caches)  # None where the model cannot be recorded
        return caches

    @property
    def cuda_graphs_enabled(self) -> bool:
        """Decode steps replay CUDA graphs on CUDA, unless `enforce_eager` or a pipeline stage other than
        the only one (stages exchange hidden states, which the graphs do not take)."""
        return (
            self.device.type == "cuda"
            and not self.engine_config.enforce_eager
            and self.stage.size == 1
            and triton_supports(self.block_size)  # the graphs replay the Triton decode kernel
        )

    @property
    def compiled_decode_enabled(self) -> bool:
        """CPU decode steps run compiled when `compile_decode` is asked for (and not `enforce_eager`), on a
        single rank: a gloo all-reduce or a pipeline hand-over would split the graph."""
        return (
            self.device.type == "cpu"
            and self.engine_config.compile_decode
            and not self.engine_config.enforce_eager
            and self.stage.size == 1
            and self.tp.size == 1
        )

    def prepare_model_input(self, request: ExecuteModelRequest) -> LlamaModelInput:
        scheduled = request.scheduled
        block_size = self.block_size
        num_tokens = sum(seq.num_tokens for seq in scheduled)
        input_ids = np.fromiter(itertools.chain.from_iterable(seq.token_ids for seq in scheduled), np.int64, num_tokens)
        positions = np.empty(num_tokens, np.int64)
        slot_mapping = np.empty(num_tokens, np.int64)
        query_start_loc = np.zeros(len(scheduled) + 1, np.int64)
        max_blocks = max((len(seq.block_table) for seq in scheduled), default=0)
        block_tables = np.full((len(scheduled), max_blocks), self.scratch_block, np.int64)
        start = 0
        for row, seq in enumerate(scheduled):
            end = start + seq.num_tokens
            table = seq.block_table
            block_tables[row, : len(table)] = table
            if seq.num_tokens == 1:  # a decode: plain Python beats numpy for one token
                position = seq.start_position
                positions[start] = position
                slot_mapping[start] = table[position // block_size] * block_size + position % block_size
            else:
                seq_positions = np.arange(seq.start_position, seq.seq_len)
                positions[start:end] = seq_positions
                slot_mapping[start:end] = block_tables[row, seq_positions // block_size] * block_size + seq_positions % block_size
            query_start_loc[row + 1] = start = end
        sampled = [seq for seq in scheduled if seq.do_sample]
        logits_indices = query_start_loc[1:][[seq.do_sample for seq in scheduled]] - 1 if scheduled else np.zeros(0, np.int64)

        arrays = {
            "input_ids": input_ids,
            "positions": positions,
            "slot_mapping": slot_mapping,
            "query_start_loc": query_start_loc,
            "seq_lens": np.array([seq.seq_len for seq in scheduled], np.int64),
            "block_tables": block_tables,
            "logits_indices": np.asarray(logits_indices, np.int64),
        }
        # Built on every stage (it is small): whoever prepares the input may not be the stage that samples.
        if sampled:
            arrays.update(SamplingTensors.host_arrays(sampled, self.model_config.vocab_size))
        staged = self.staging.stage(arrays)  # one copy to the device
        max_query_len = max((seq.num_tokens for seq in scheduled), default=0)
        prefill = max_query_len > 1
        return LlamaModelInput(
            input_ids=staged["input_ids"],
            positions=staged["positions"],
            slot_mapping=staged["slot_mapping"],
            query_start_loc=staged["query_start_loc"],
            seq_lens=staged["seq_lens"],
            block_tables=staged["block_tables"],
            max_query_len=max_query_len,
            max_seq_len=max((seq.seq_len for seq in scheduled), default=0),
            logits_indices=staged["logits_indices"],
            sampled_seq_ids=[seq.seq_id for seq in sampled],
            sampling=SamplingTensors.from_staged(staged, sampled) if sampled else None,
            host_query_lens=[seq.num_tokens for seq in scheduled] if prefill else None,
            host_seq_lens=[seq.seq_len for seq in scheduled] if prefill else None,
        )

    @property
    def native_decode_enabled(self) -> bool:
        """CPU decode steps run as one native call (`native_decode`, where the model allows it) unless
        `enforce_eager`, `compile_decode` or `batch_invariant`, on a single rank."""
        config = self.engine_config
        return (
            self.device.type == "cpu"
            and not (config.enforce_eager or config.compile_decode or config.batch_invariant)
            and self.stage.size == 1
            and self.tp.size == 1
        )

    def make_model_input_from_broadcasted_tensor_dict(self, tensor_dict: dict[str, Any]) -> LlamaModelInput:
        return LlamaModelInput.from_broadcasted_tensor_dict(tensor_dict)

    def attention_metadata(self, model_input: LlamaModelInput) -> AttentionMetadata:
        """How this step's attention reads the cache (built once, shared by every layer)."""
        return AttentionMetadata.build(
            query_start_loc=model_input.query_start_loc,
            seq_lens=model_input.seq_lens,
            block_tables=model_input.block_tables,
            slot_mapping=model_input.slot_mapping,
            block_size=self.block_size,
            max_query_len=model_input.max_query_len,
            max_seq_len=model_input.max_seq_len,
            sliding_window=self.model_config.sliding_window,
            pad_slot=self.scratch_block * self.block_size,
            batch_invariant=self.engine_config.batch_invariant,
            cache_dtype=self.kv_cache_dtype,
            query_dtype=self.dtype,
            host_query_lens=model_input.host_query_lens,
            host_seq_lens=model_input.host_seq_lens,
        )

    @torch.inference_mode()
    def execute_model(
        self,
        model_input: LlamaModelInput,
        kv_cache: list[torch.Tensor],
        intermediate: IntermediateOutput | None = None,
    ) -> SamplerOutput | IntermediateOutput | None:
        assert self.model is not None, "load_model() first"
        graphs, compiled, native = self.decode_graphs, self.compiled_decode, self.native_decode
        if graphs is not None and intermediate is None and graphs.can_run(model_input):
            out = graphs.run(model_input)  # a replayed decode step
        elif native is not None and intermediate is None and native.can_run(model_input):
            out = native.run(model_input)  # the recorded decode step, one native call
        else:
            metadata = self.attention_metadata(model_input)
            out = None
            if compiled is not None and intermediate is None and compiled.can_run(model_input):
                out = compiled.run(model_input.input_ids, model_input.positions, metadata)  # None: not compilable
            if out is None:
                out = self.model(model_input.input_ids, model_input.positions, kv_cache, metadata, intermediate)
        if isinstance(out, IntermediateOutput):
            return out
        hidden = self.process_hidden_states(out.index_select(0, model_input.logits_indices), model_input)
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

