"""Every engine setting in one picklable, validated place (it is sent to worker processes)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from chat_core.config import resolve_dtype
from chat_core.parallel import check_tensor_parallel_size, split_layers
from chat_core.quantization import resolve_dtype_name, resolve_quantization, validate_quantization

if TYPE_CHECKING:
    from chat_core.checkpoint.checkpoint import Checkpoint

CONTROL_PLANES = ("broadcast", "spmd")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    model: str  # a directory, a .gguf file, or an alias
    dtype: str = "auto"  # of the activations (and of dense weights); "auto": see chat_core.quantization
    device: str = "cpu"
    quantization: str | None = "auto"  # None/"none", "int8", "int4", "gguf" or "auto": see chat_core.quantization
    quantization_group_size: int | None = None  # int4 only: 32, 64 or 128 (default 32)
    # What quantized layers multiply in: "auto" is float32 where our native CPU kernels run (AVX-512; exact and
    # faster there), else bfloat16; "float32" elsewhere is exact but slow (torch's reference loops).
    quantization_compute_dtype: str = "auto"
    max_model_len: int | None = None  # default: the model's context, capped at 8192
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory_gib: float = 1.0  # memory for the KV cache on each rank
    # What the KV cache holds keys and values in: "auto" is `dtype`; "bfloat16" (or "float16") beside float32
    # activations halves the cache (twice the tokens in `kv_cache_memory_gib`), keys and values rounded as cached.
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes computed before
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    layers_per_stage: tuple[int, ...] | None = None
    control_plane: str = "broadcast"
    model_runner_cls: Any = None  # a ModelRunnerBase subclass, or "module:Class"; None for the default
    seed: int = 0  # for requests without a seed of their own
    enforce_eager: bool = False  # no CUDA graphs (nor compiled or natively recorded CPU decode) for decode steps
    compile_decode: bool = False  # CPU: torch.compile the decode step (first start compiles; see worker/compiled_decode.py)
    # CPU: every request's tokens and logits are those it gets alone, whatever else is batched with it
    # (slower: see layers/attention.py, BatchInvariantAttentionMetadata)
    batch_invariant: bool = False
    distributed_timeout_s: float = 60.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype != "auto":
            resolve_dtype(self.dtype)
        validate_quantization(self.quantization, self.quantization_group_size)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"EngineConfig.kv_cache_dtype={self.kv_cache_dtype!r} is invalid: expected one of {', '.join(KV_CACHE_DTYPES)}")
        if self.quantization_compute_dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(
                f"EngineConfig.quantization_compute_dtype={self.quantization_compute_dtype!r} is invalid: "
                "expected auto, bfloat16 or float32"
            )
        positive = ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size", "pipeline_parallel_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name}={value!r} is invalid: expected an integer >= 1")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"EngineConfig.max_model_len={self.max_model_len!r} is invalid: expected an integer >= 1")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"EngineConfig.enable_prefix_caching={self.enable_prefix_caching!r} is invalid: expected True or False")
        if not (isinstance(self.kv_cache_memory_gib, (int, float)) and 0 < self.kv_cache_memory_gib < float("inf")):
            raise ValueError(f"EngineConfig.kv_cache_memory_gib={self.kv_cache_memory_gib!r} is invalid: expected a number > 0")
        if self.batch_invariant and not self.device.startswith("cpu"):
            raise ValueError(f"EngineConfig.batch_invariant=True is implemented on CPU only; device={self.device!r}")
        if self.batch_invariant and self.dtype != "auto" and resolve_dtype(self.dtype) == torch.float16:
            # Measured: float16 products on CPU give a row other bits at 1 and at 2+ rows; float32 and bfloat16
            # have row-invariant kernels.
            raise ValueError("EngineConfig.batch_invariant=True needs dtype float32 or bfloat16 (or auto); got float16")
        if self.batch_invariant and self.compile_decode:
            raise ValueError(
                "EngineConfig.batch_invariant=True runs every step eagerly: it cannot be combined with compile_decode=True"
            )
        if self.control_plane not in CONTROL_PLANES:
            raise ValueError(
                f"EngineConfig.control_plane={self.control_plane!r} is invalid: expected one of {', '.join(CONTROL_PLANES)}"
            )
        check_device(self.device)  # last: what the options ask of the machine, once the options themselves hold

    def resolved_for(self, checkpoint: Checkpoint) -> EngineConfig:
        """This config with `quantization` and `dtype` made concrete for `checkpoint` (idempotent), and its parallel
        sizes checked against the model (before any rank is started: a rank would find out late, alone)."""
        model = checkpoint.config
        check_tensor_parallel_size(self.tensor_parallel_size, model.num_heads, model.num_kv_heads, model.intermediate_size)
        split_layers(model.num_layers, self.pipeline_parallel_size, list(self.layers_per_stage) if self.layers_per_stage else None)
        quantization = resolve_quantization(self.quantization, checkpoint.tensor_formats(), checkpoint.path)
        dtype = resolve_dtype_name(self.dtype, self.device)
        return dataclasses.replace(self, quantization=quantization, dtype=dtype)

    def resolve_kv_cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype: `kv_cache_dtype`, or for "auto" that of the activations (`dtype`, resolved)."""
        return resolve_dtype(self.kv_cache_dtype if self.kv_cache_dtype != "auto" else resolve_dtype_name(self.dtype, self.device))

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def resolve_max_model_len(self, model_max: int) -> int:
        if self.max_model_len is None:
            return min(model_max, 8192)
        if self.max_model_len > model_max:
            raise ValueError(f"max_model_len={self.max_model_len} is more than the model's context of {model_max} tokens")
        return self.max_model_len


DEVICE_TYPES = ("cpu", "cuda")


def check_device(device: str) -> None:
    """`device` names a device this engine runs on and this machine has: "cpu", "cuda" or "cuda:N"."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"EngineConfig.device={device!r} is invalid: expected cpu, cuda or cuda:N") from exc
    if parsed.type not in DEVICE_TYPES or (parsed.type == "cpu" and parsed.index not in (None, 0)):
        raise ValueError(f"EngineConfig.device={device!r} is not supported: expected cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"EngineConfig.device={device!r}, but {build}")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"EngineConfig.device={device!r}, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
