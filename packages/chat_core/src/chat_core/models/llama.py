"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2), buildable for one pipeline stage and
one tensor-parallel rank.

Checkpoint names follow Hugging Face (`model.layers.3.self_attn.q_proj.weight`); `load_weights`
hands each tensor to the parameter's own layer, which reads only the slice this rank holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from chat_core.checkpoint.errors import CheckpointError
from chat_core.checkpoint.tensor_source import TensorSource
from chat_core.config import ModelConfig
from chat_core.layers.attention import Attention, AttentionMetadata
from chat_core.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from chat_core.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from chat_core.layers.norm import RMSNorm
from chat_core.layers.rotary import RotaryEmbedding, apply_rotary
from chat_core.outputs import IntermediateOutput
from chat_core.parallel import SINGLE_RANK, PipelineStage, TensorParallelGroup

# Checkpoint tensors that are fused into one parameter here: name fragment -> (fused fragment, shard).
FUSED_PARAMETERS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallelGroup, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_heads,
            config.num_kv_heads,
            bias=config.attention_bias,
            tp=tp,
            dtype=dtype,
            device=device,
        )
        self.num_heads = self.qkv_proj.num_local_heads
        self.num_kv_heads = self.qkv_proj.num_local_kv_heads
        self.head_dim = config.head_dim
        self.o_proj = RowParallelLinear(
            config.num_heads * config.head_dim, config.hidden_size, tp=tp, dtype=dtype, device=device
        )
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rotary(q.view(-1, self.num_heads, self.head_dim), *rope)
        k = apply_rotary(k.view(-1, self.num_kv_heads, self.head_dim), *rope)
        out = self.attn(q, k, v.view(-1, self.num_kv_heads, self.head_dim), kv_cache, metadata)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallelGroup, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, tp=tp, dtype=dtype, device=device
        )
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, tp=tp, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallelGroup, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.self_attn = LlamaAttention(config, tp, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.mlp = LlamaMLP(config, tp, dtype, device)

    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(hidden_states, rope, kv_cache, metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaForCausalLM(nn.Module):
    """Layers [stage.start_layer, stage.end_layer) of the decoder; the embedding on the first stage,
    the final norm and LM head on the last."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        max_positions: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        tp: TensorParallelGroup = SINGLE_RANK,
        stage: PipelineStage = PipelineStage(),
    ) -> None:
        super().__init__()
        self.config = config
        self.stage = stage
        self.start_layer = stage.start_layer
        self.end_layer = config.num_layers if stage.end_layer is None else stage.end_layer
        self.embed_tokens = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp=tp, dtype=dtype, device=device)
            if stage.is_first
            else None
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, tp, dtype, device) for _ in range(self.start_layer, self.end_layer)
        )
        self.rotary = RotaryEmbedding(
            config.head_dim, max_positions, config.rope_theta, config.rope_scaling, device=device
        )
        if stage.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
            shares_embedding = config.tie_word_embeddings and self.embed_tokens is not None
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, tp=tp, dtype=dtype, device="meta" if shares_embedding else device
            )
            if shares_embedding:
                self.lm_head.weight = self.embed_tokens.weight  # same rows, same split: one tensor
        else:
            self.norm = None
            self.lm_head = None

    @property
    def num_kv_heads_per_rank(self) -> int:
        return self.layers[0].self_attn.num_kv_heads

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
        intermediate: IntermediateOutput | None = None,
    ) -> torch.Tensor | IntermediateOutput:
        """Final hidden states on the last stage, else the hidden states and residual for the next stage."""
        if self.stage.is_first:
            hidden_states, residual = self.embed_tokens(input_ids), None
        else:
            if intermediate is None:
                raise ValueError(f"pipeline stage {self.stage.rank} needs the previous stage's IntermediateOutput")
            hidden_states, residual = intermediate.hidden_states, intermediate.residual
        rope = self.rotary.lookup(positions, hidden_states.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden_states, residual = layer(hidden_states, residual, rope, kv_cache, metadata)
        if not self.stage.is_last:
            return IntermediateOutput(hidden_states=hidden_states, residual=residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, tensors: Iterable[tuple[str, TensorSource]], source: str = "checkpoint") -> None:
        """Give each checkpoint tensor to its parameter's layer; tensors of other stages are skipped unread."""
        owners = self._parameter_owners()
        loaded: set[str] = set()
        for name, tensor in tensors:
            local_name = self._local_name(name)
            if local_name is None:
                continue
            shard = 0
            for fragment, (fused, fused_shard) in FUSED_PARAMETERS.items():
                if f".{fragment}." in local_name:
                    local_name, shard = local_name.replace(f".{fragment}.", f".{fused}."), fused_shard
                    break
            if local_name not in owners:
                raise CheckpointError(f"{source}: tensor {name!r} does not belong to a {self.config.architecture} model")
            module, param = owners[local_name]
            module.load_shard(param, tensor, shard)
            loaded.add(f"{local_name}#{shard}")
        self._check_complete(loaded, source)
        self._pack_weights()

    def _pack_weights(self) -> None:
        """Pre-pack weights for the CPU GEMM where it measured faster: the LM head always (wide, and the
        default GEMM is slow on a few rows), the other layers in bfloat16 (faster at every batch size)."""
        if self.lm_head is not None:
            self.lm_head.pack()
        if next(self.parameters()).dtype == torch.bfloat16:
            for module in self.modules():
                if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                    module.pack()

    def _local_name(self, name: str) -> str | None:
        """This module's parameter name for a checkpoint tensor, or None if another stage owns it."""
        if name.startswith("model."):
            match = _LAYER_NAME.match(name)
            if match:
                layer = int(match.group(1))
                if not self.start_layer <= layer < self.end_layer:
                    return None
                return f"layers.{layer - self.start_layer}." + name[match.end() :]
            if name.startswith("model.embed_tokens."):
                if self.embed_tokens is None:
                    # On a last stage with tied embeddings the LM head is loaded from the embedding.
                    tied = self.config.tie_word_embeddings and self.lm_head is not None
                    return name.replace("model.embed_tokens.", "lm_head.") if tied else None
                return name[len("model.") :]
            if name.startswith("model.norm."):
                return name[len("model.") :] if self.norm is not None else None
            return name[len("model.") :]
        if name.startswith("lm_head."):
            if self.lm_head is None or self.config.tie_word_embeddings:
                return None
            return name
        if "rotary_emb.inv_freq" in name:
            return None
        return name

    def _parameter_owners(self) -> dict[str, tuple[nn.Module, nn.Parameter]]:
        """Each parameter by name, with the layer that loads it; a shared (tied) tensor is listed once."""
        owners: dict[str, tuple[nn.Module, nn.Parameter]] = {}
        seen: set[int] = set()
        for module_name, module in self.named_modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) not in seen:
                    seen.add(id(param))
                    owners[f"{module_name}.{name}" if module_name else name] = (module, param)
        return owners

    def _check_complete(self, loaded: set[str], source: str) -> None:
        expected = set()
        for name, (module, _) in self._parameter_owners().items():
            shards = len(module.local_sizes) if isinstance(module, ColumnParallelLinear) else 1
            expected.update(f"{name}#{shard}" for shard in range(shards))
        missing = sorted(expected - loaded)
        if missing:
            shown = ", ".join(m.split("#")[0] for m in missing[:5])
            raise CheckpointError(f"{source}: {len(missing)} weights are missing, e.g. {shown}")

