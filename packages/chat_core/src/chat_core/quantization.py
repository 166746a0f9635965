"""Which `LinearMethod` each layer gets, decided once from the engine's settings and the checkpoint.

`quantization` (an `EngineConfig` field, `--quantize` on the command line):
- `None`: dense weights in the engine's dtype (a GGUF's quantized tensors are dequantized at load); on CPUs
  where the native kernels run, bfloat16 ones are multiplied by ours (`NativeBf16Method`), not oneDNN's.
- `"int8"`: int8 with a scale per output channel, quantized as each tensor is read.
- `"int4"`: 4-bit groups of `quantization_group_size` along the input, quantized as each tensor is read;
  the LM head in int8 (on SmolLM2 an int4 head raised perplexity from 16.5 to 17.7 and dropped teacher-forced
  top-1 agreement with the dense model from 97% to 78%; int8 there costs nothing measurable, and as little time).
- `"gguf"`: a GGUF's quantized tensors kept as they are where a kernel multiplies them exactly: Q4_0, Q4_1
  and Q4_K as 4-bit groups of 32, and (on CPUs where the native kernels of `native_kernels` run) Q8_0, Q5_0,
  Q5_1, Q5_K and Q6_K as int8 with a scale (and for Q5_1/Q5_K a minimum) per 32 (Q6_K: 16) inputs; a fused
  layer whose parts no one kernel takes keeps each part on its own (`PartsMethod`); every other tensor is
  dequantized as with `None`. Without the native kernels Q8_0 stays dense on purpose: its per-32 scales fit
  no torch kernel, and re-rounding it to one scale per row (int8), though it moved SmolLM2's perplexity only
  from 16.48 to 16.53, flips the first token of its answer to "What is the capital of France?" (a 0.1-logit
  tie), as does a bfloat16 copy of its Q8_0 embedding/LM head.
- `"auto"` (the default): `"gguf"` for a GGUF file with tensors of those types, otherwise `None`.

Embeddings stay dense (they are gathered, not multiplied), except a tied one, which reads its rows from
the LM head's quantized weight where the device's kernel allows it, so the table is kept once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from chat_core.layers.linear_methods import (
    GGUF_INT8_GROUP_SIZES,
    DenseMethod,
    Int4Method,
    Int8GroupsMethod,
    Int8Method,
    LinearMethod,
    NativeBf16Method,
    PartsMethod,
)
from chat_core.layers.weight_formats import INT4_GROUP_SIZES
from chat_core.layers.weight_kernels import native_available

QUANTIZATIONS = ("auto", "none", "int8", "int4", "gguf")
GGUF_INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # 4-bit groups of 32: exactly what the int4 kernels take
GGUF_INT8_TYPES = tuple(GGUF_INT8_GROUP_SIZES)  # int8 groups (with minima): what the native int8 kernel takes
# Measured on SmolLM2 (benchmarks/bench_quality.py): groups of 64 or 128 cost far more accuracy than 32
# (perplexity 16.5 -> 24-29) for a few percent of speed.
DEFAULT_INT4_GROUP_SIZE = 32


def validate_quantization(quantization: str | None, group_size: int | None) -> None:
    if quantization not in (*QUANTIZATIONS, None):
        raise ValueError(f"quantization={quantization!r} is invalid: expected one of {', '.join(QUANTIZATIONS)} or None")
    if group_size is not None and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"quantization_group_size={group_size!r} is invalid: expected one of {INT4_GROUP_SIZES}")


def resolve_quantization(quantization: str | None, tensor_formats: Mapping[str, str], source: str) -> str | None:
    """The concrete mode for a checkpoint whose tensors are stored as `tensor_formats` (name -> type)."""
    validate_quantization(quantization, None)
    is_gguf = any(fmt.startswith("Q") for fmt in tensor_formats.values())
    if quantization is None or quantization == "none":
        return None
    if quantization == "auto":  # a GGUF with tensors "gguf" keeps as stored (int8 ones where the native kernels run)
        return "gguf" if any(fmt in (*GGUF_INT4_TYPES, *GGUF_INT8_TYPES) for fmt in tensor_formats.values()) else None
    if quantization == "gguf" and not is_gguf:
        raise ValueError(f"quantization='gguf' keeps a GGUF file's quantized tensors, but {source} has none")
    return quantization


def resolve_dtype_name(dtype: str, device: str) -> str:
    """`dtype="auto"`: bfloat16 on CUDA, float32 on CPU (where quantized layers may multiply in bfloat16, see
    `weight_kernels`: float32 activations around them keep a small model's answers those of float32)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


@dataclass(frozen=True)
class QuantizationPlan:
    """Hands out one method per layer; the model asks by the checkpoint names that feed the layer."""

    mode: str | None = None  # resolved: None, "int8", "int4" or "gguf"
    dtype: torch.dtype = torch.float32
    # Of the quantized products (see weight_kernels); None: the faster here (`kernel_compute_dtype`).
    compute_dtype: torch.dtype | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group_size: int = DEFAULT_INT4_GROUP_SIZE
    tensor_formats: Mapping[str, str] = field(default_factory=dict)
    # Every product gives a row the same bits whatever other rows it is multiplied with (see `linear`).
    batch_invariant: bool = False

    def linear(self, checkpoint_names: list[str]) -> LinearMethod:
        """The method of a linear layer fed by these checkpoint tensors (several when fused: q/k/v)."""
        quantized = self._quantized(checkpoint_names)
        if quantized is not None:
            return quantized
        # oneDNN's packed weights measured faster than F.linear in bfloat16 at every batch size. In float32 they
        # are slower for a few rows, but row-invariant, where F.linear (MKL) sums a row in an order that depends
        # on the number of rows; the int4, int8 and bfloat16 kernels are row-invariant as they are.
        if self._native_bf16:
            return NativeBf16Method(self.dtype, self.device)
        pack = self.dtype == torch.bfloat16 or (self.batch_invariant and self.dtype == torch.float32)
        return DenseMethod(self.dtype, self.device, pack=self._on_cpu and pack)

    def lm_head(self, checkpoint_name: str, *, tied: bool) -> LinearMethod:
        """The LM head's method; when `tied` it is also the embedding table, so it must read rows back."""
        if self.mode == "int4":
            return Int8Method(self.dtype, self.device, self.kernel_compute_dtype)  # see the module docstring
        quantized = self._quantized([checkpoint_name])
        if quantized is not None and (not tied or quantized.can_read_rows):
            return quantized
        # Packing pays most here (a wide weight, few rows), but a tied table must stay readable by rows; a
        # batch-invariant float32 one then multiplies two rows at a time (the same bits for any batch).
        if self._native_bf16:  # readable by rows as it is
            return NativeBf16Method(self.dtype, self.device)
        row_pairs = self.batch_invariant and tied and self.dtype == torch.float32
        return DenseMethod(self.dtype, self.device, pack=self._on_cpu and not tied, row_pairs=row_pairs)

    def embedding(self) -> LinearMethod:
        return DenseMethod(self.dtype, self.device)

    @property
    def kernel_compute_dtype(self) -> torch.dtype:
        """Unless set: float32 where the native CPU kernels run (exact, and measured faster here than torch's
        bfloat16 kernels: benchmarks/bench_generate.py), else bfloat16 (the only dtype torch's are fast in)."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.float32 if native_available(self.device, torch.float32) else torch.bfloat16

    @property
    def _native_bf16(self) -> bool:
        """Dense bfloat16 weights go to the native CPU kernel where it runs (faster than oneDNN's here)."""
        return self.dtype == torch.bfloat16 and native_available(self.device, torch.float32)

    @property
    def _on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def _quantized(self, checkpoint_names: list[str]) -> LinearMethod | None:
        if self.mode == "int8":
            return Int8Method(self.dtype, self.device, self.kernel_compute_dtype)
        if self.mode == "int4":
            return Int4Method(self.dtype, self.device, self.group_size, self.kernel_compute_dtype)
        if self.mode == "gguf":
            formats = {self.tensor_formats.get(name) for name in checkpoint_names}
            if formats <= set(GGUF_INT4_TYPES):
                return Int4Method(self.dtype, self.device, 32, self.kernel_compute_dtype)
            one_group_size = formats <= set(GGUF_INT8_TYPES) and len({GGUF_INT8_GROUP_SIZES[f] for f in formats}) == 1
            if one_group_size and native_available(self.device, torch.float32):
                return Int8GroupsMethod(self.dtype, self.device, stored_as=tuple(formats))
            if len(checkpoint_names) > 1:  # a fused layer of parts no one kernel takes together: each on its own
                parts = [self._quantized([name]) for name in checkpoint_names]
                if any(part is not None for part in parts):
                    methods = [part or self.linear([name]) for part, name in zip(parts, checkpoint_names)]
                    return PartsMethod(self.dtype, self.device, methods)
        return None
