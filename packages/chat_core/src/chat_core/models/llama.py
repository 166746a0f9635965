"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2), buildable for one pipeline stage and
one tensor-parallel rank.

Checkpoint names follow Hugging Face (`model.layers.3.self_attn.q_proj.weight`); `load_weights`
hands each tensor to the parameter's own layer, which reads only the slice this rank holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from chat_core.checkpoint.errors import CheckpointError
from chat_core.checkpoint.tensor_source import TensorSource
from chat_core.config import ModelConfig
from chat_core.layers.activation import silu_and_mul
from chat_core.layers.attention import Attention, AttentionMetadata
from chat_core.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from chat_core.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from chat_core.layers.norm import RMSNorm
from chat_core.layers.rotary import RotaryEmbedding, apply_rotary
from chat_core.outputs import IntermediateOutput
from chat_core.parallel import SINGLE_RANK, PipelineStage, TensorParallelGroup
from chat_core.quantization import QuantizationPlan

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
    def __init__(self, config: ModelConfig, tp: TensorParallelGroup, plan: QuantizationPlan, prefix: str) -> None:
        super().__init__()
        dtype, device = plan.dtype, plan.device
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_heads,
            config.num_kv_heads,
            bias=config.attention_bias,
            tp=tp,
            dtype=dtype,
            device=device,
            method=plan.linear([f"{prefix}.{name}.weight" for name in ("q_proj", "k_proj", "v_proj")]),
        )
        self.num_heads = self.qkv_proj.num_local_heads
        self.num_kv_heads = self.qkv_proj.num_local_kv_heads
        self.head_dim = config.head_dim
        self.o_proj = RowParallelLinear(
            config.num_heads * config.head_dim,
            config.hidden_size,
            tp=tp,
            dtype=dtype,
            device=device,
            method=plan.linear([f"{prefix}.o_proj.weight"]),
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
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        # q and k are adjacent in the fused output: rotate them together, then split the views.
        qk = apply_rotary(qkv[:, : (heads + kv_heads) * head_dim].view(-1, heads + kv_heads, head_dim), *rope)
        q, k = qk.split([heads, kv_heads], dim=1)
        v = qkv[:, (heads + kv_heads) * head_dim :].view(-1, kv_heads, head_dim)
        out = self.attn(q, k, v, kv_cache, metadata)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallelGroup, plan: QuantizationPlan, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size,
            [config.intermediate_size] * 2,
            tp=tp,
            method=plan.linear([f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight"]),
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, tp=tp, method=plan.linear([f"{prefix}.down_proj.weight"])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallelGroup, plan: QuantizationPlan, prefix: str) -> None:
        super().__init__()
        dtype, device = plan.dtype, plan.device
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.self_attn = LlamaAttention(config, tp, plan, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.mlp = LlamaMLP(config, tp, plan, f"{prefix}.mlp")

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
        quantization: QuantizationPlan | None = None,
    ) -> None:
        super().__init__()
        plan = quantization or QuantizationPlan(dtype=dtype, device=torch.device(device or "cpu"))
        dtype, device = plan.dtype, plan.device
        self.config = config
        self.stage = stage
        self.start_layer = stage.start_layer
        self.end_layer = config.num_layers if stage.end_layer is None else stage.end_layer
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, tp, plan, f"model.layers.{index}") for index in range(self.start_layer, self.end_layer)
        )
        self.rotary = RotaryEmbedding(
            config.head_dim, max_positions, config.rope_theta, config.rope_scaling, device=device
        )
        tied = config.tie_word_embeddings
        self.embed_tokens: VocabParallelEmbedding | None = None
        self.lm_head: ParallelLMHead | None = None
        self.norm: RMSNorm | None = None
        if stage.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
            head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
            method = plan.lm_head(head_name, tied=tied and stage.is_first)
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp=tp, method=method)
        if stage.is_first:
            if tied and self.lm_head is not None:
                self.embed_tokens = self.lm_head  # one table, used both ways
            else:
                self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp=tp, method=plan.embedding())

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
        """Give each checkpoint tensor to its layer, which reads only this rank's slice (and quantizes or packs
        it as its method says); tensors of other stages are skipped unread."""
        modules = dict(self.named_modules(remove_duplicate=False))  # a tied table answers to both names
        loaded: set[tuple[int, str, int]] = set()
        for name, tensor in tensors:
            local_name = self._local_name(name)
            if local_name is None:
                continue
            shard = 0
            for fragment, (fused, fused_shard) in FUSED_PARAMETERS.items():
                if f".{fragment}." in local_name:
                    local_name, shard = local_name.replace(f".{fragment}.", f".{fused}."), fused_shard
                    break
            module_name, _, tensor_name = local_name.rpartition(".")
            module = modules.get(module_name)
            if module is None or (tensor_name, shard) not in module.expected_shards():
                raise CheckpointError(f"{source}: tensor {name!r} does not belong to a {self.config.architecture} model")
            module.load_shard(tensor_name, tensor, shard)
            loaded.add((id(module), tensor_name, shard))
        self._check_complete(loaded, source)

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

    def _check_complete(self, loaded: set[tuple[int, str, int]], source: str) -> None:
        missing = [
            f"{module_name}.{tensor_name}"
            for module_name, module in self.named_modules()
            if hasattr(module, "expected_shards")
            for tensor_name, shard in sorted(module.expected_shards())
            if (id(module), tensor_name, shard) not in loaded
        ]
        if missing:
            shown = ", ".join(dict.fromkeys(missing[:5]))
            raise CheckpointError(f"{source}: {len(missing)} weights are missing, e.g. {shown}")
