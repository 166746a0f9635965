"""The hyper-parameters of a Llama-family model, read from a Hugging Face `config.json` or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = {
    # Hugging Face `architectures[0]` -> family name we use internally.
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this library cannot run; the message says what is supported."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `default` (none), `linear`, or Llama 3's `llama3` (wavelength-dependent)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, source: str) -> RopeScaling:
        if not raw:
            return cls()
        rope_type = raw.get("rope_type", raw.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"{source}: rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        return cls(
            rope_type=rope_type,
            factor=float(raw.get("factor", 1.0)),
            low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model definition needs; nothing about where the weights live."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} must be a multiple of num_key_value_heads={self.num_kv_heads}"
            )

    @classmethod
    def from_hf_config(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        architectures = raw.get("architectures") or []
        architecture = architectures[0] if architectures else raw.get("model_type", "<missing>")
        family = SUPPORTED_ARCHITECTURES.get(architecture)
        if family is None:
            raise UnsupportedModelError(
                f"{source}: architecture {architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            num_heads = int(raw["num_attention_heads"])
            hidden_size = int(raw["hidden_size"])
            eos = raw.get("eos_token_id")
            sliding_window = raw.get("sliding_window")
            if family == "qwen2" and not raw.get("use_sliding_window", False):
                sliding_window = None
            return cls(
                architecture=family,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
                head_dim=int(raw.get("head_dim") or hidden_size // num_heads),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
                rope_scaling=RopeScaling.from_dict(_rope_scaling_dict(raw), source),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
                sliding_window=int(sliding_window) if sliding_window else None,
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
            )
        except KeyError as exc:
            raise UnsupportedModelError(f"{source}: required field {exc.args[0]!r} is missing") from exc

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any], source: str) -> ModelConfig:
        arch = metadata.get("general.architecture", "<missing>")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{source}: GGUF architecture {arch!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
            )

        def get(key: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{key}", default)
            if value is None:
                raise UnsupportedModelError(f"{source}: GGUF metadata {arch}.{key} is missing")
            return value

        num_heads = int(get("attention.head_count"))
        hidden_size = int(get("embedding_length"))
        vocab_size = metadata.get(f"{arch}.vocab_size") or len(metadata.get("tokenizer.ggml.tokens", ()))
        rope_scaling = None
        if metadata.get(f"{arch}.rope.scaling.type") == "linear":
            rope_scaling = {"rope_type": "linear", "factor": metadata[f"{arch}.rope.scaling.factor"]}
        eos = metadata.get("tokenizer.ggml.eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=int(vocab_size),
            hidden_size=hidden_size,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(get("attention.head_count_kv", num_heads)),
            head_dim=int(metadata.get(f"{arch}.attention.key_length") or hidden_size // num_heads),
            max_position_embeddings=int(get("context_length", 2048)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=RopeScaling.from_dict(rope_scaling, source),
            tie_word_embeddings=False,  # decided by the loader: tied when the file has no output.weight
            attention_bias=arch == "qwen2",
            sliding_window=None,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(int(eos),) if eos is not None else (),
        )


def _rope_scaling_dict(raw: dict[str, Any]) -> dict[str, Any] | None:
    # transformers 5 moved rope settings into `rope_parameters`; older configs use `rope_scaling`.
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        return None
    return scaling


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; expected one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
