"""Every engine setting in one picklable, validated place (it is sent to worker processes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chat_core.config import resolve_dtype

CONTROL_PLANES = ("broadcast", "spmd")


@dataclass(frozen=True)
class EngineConfig:
    model: str  # a directory, a .gguf file, or an alias
    dtype: str = "float32"
    device: str = "cpu"
    max_model_len: int | None = None  # default: the model's context, capped at 8192
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory_gib: float = 1.0  # memory for the KV cache on each rank
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes computed before
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    layers_per_stage: tuple[int, ...] | None = None
    control_plane: str = "broadcast"
    model_runner_cls: Any = None  # a ModelRunnerBase subclass, or "module:Class"; None for the default
    seed: int = 0  # for requests without a seed of their own
    distributed_timeout_s: float = 60.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype)
        positive = ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size", "pipeline_parallel_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name}={value!r} is invalid: expected an integer >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"EngineConfig.max_model_len={self.max_model_len!r} is invalid: expected an integer >= 1")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"EngineConfig.enable_prefix_caching={self.enable_prefix_caching!r} is invalid: expected True or False")
        if self.kv_cache_memory_gib <= 0:
            raise ValueError(f"EngineConfig.kv_cache_memory_gib={self.kv_cache_memory_gib!r} must be > 0")
        if self.control_plane not in CONTROL_PLANES:
            raise ValueError(
                f"EngineConfig.control_plane={self.control_plane!r} is invalid: expected one of {', '.join(CONTROL_PLANES)}"
            )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def resolve_max_model_len(self, model_max: int) -> int:
        if self.max_model_len is None:
            return min(model_max, 8192)
        if self.max_model_len > model_max:
            raise ValueError(f"max_model_len={self.max_model_len} is more than the model's context of {model_max} tokens")
        return self.max_model_len
