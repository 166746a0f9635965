"""How a linear layer keeps its weight and multiplies by it (vLLM calls this a linear method).

A layer (`ColumnParallelLinear`, `RowParallelLinear`, the LM head) owns one method, chosen when it is
built (see `chat_core.quantization`). The method creates the layer's weight tensors, loads slices of a
checkpoint tensor into them as they are read (quantizing or repacking on the way), finishes them once
every slice is in (packing for its kernel and dropping anything temporary), and applies them. Whatever
the method, the layer ends up holding one copy of its weight.

- `DenseMethod`: a float weight; on CPU optionally pre-packed for oneDNN (`cpu_gemm`), the packed copy
  replacing the plain one.
- `NativeBf16Method`: a bfloat16 weight in the native CPU kernel's blocks (`native_kernels.bf16_matmul`),
  multiplied in float32: faster than oneDNN's bfloat16 product here at every batch size measured.
- `Int8Method`: int8 with a scale per output row, quantized from the checkpoint's floats.
- `Int4Method`: 4-bit groups, quantized from floats or taken as they are from a GGUF Q4_0/Q4_1/Q4_K tensor.
- `Int8GroupsMethod`: a GGUF Q8_0, Q5_0, Q5_1, Q5_K or Q6_K tensor taken as it is (int8, a scale per 32 or 16
  inputs, and a minimum for Q5_1/Q5_K).
- `PartsMethod`: a fused layer whose parts are stored in formats no one kernel takes, each part on its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from chat_core.checkpoint.tensor_source import TensorSource
from chat_core.layers import cpu_gemm, native_kernels
from chat_core.layers.weight_formats import INT4_GROUP_SIZES, INT8_GROUP_SIZE, Q6_K_GROUP_SIZE, Int4Groups, Int8Groups, quantize_int4, quantize_int8
from chat_core.layers.weight_kernels import Int4Kernel, Int8Kernel, PackedInt4


class LinearMethod(ABC):
    """Creates, loads, finishes and applies the weight of one layer: [output_size, input_size] on this rank."""

    name: str = "?"

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        self.device = torch.device(device)

    @abstractmethod
    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        """Give `layer` the (empty) tensors of its weight."""

    @abstractmethod
    def load(self, layer: nn.Module, source: TensorSource, dim: int | None, start: int, length: int | None, row_offset: int) -> None:
        """Read `length` entries of `source` from `start` along `dim` (None: all of it) into output rows
        `row_offset...` of the weight."""

    def finish(self, layer: nn.Module) -> None:
        """Called once every slice of the weight is loaded."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T"""

    @property
    def can_read_rows(self) -> bool:
        """Whether `read_rows` works, i.e. whether this weight can also serve as a (tied) embedding table."""
        return True

    @abstractmethod
    def read_rows(self, layer: nn.Module, row_ids: torch.Tensor) -> torch.Tensor:
        """Rows `row_ids` of the weight, in the activation dtype (an embedding lookup)."""

    def extra_repr(self) -> str:
        return self.name


class DenseMethod(LinearMethod):
    """A float weight, multiplied with `F.linear`, or with oneDNN when `pack` (faster on CPU where measured).
    `row_pairs`: `F.linear` two rows at a time, so that each row gets the same bits whatever the number of
    rows (float32 MKL sums in an order that depends on it; for two rows it costs what one row does)."""

    name = "dense"

    def __init__(self, dtype: torch.dtype, device: torch.device, *, pack: bool = False, row_pairs: bool = False) -> None:
        super().__init__(dtype, device)
        self.pack = pack
        self.row_pairs = row_pairs

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=self.dtype, device=self.device), requires_grad=False)
        layer.register_buffer("packed_weight", None, persistent=False)

    def load(self, layer, source, dim, start, length, row_offset) -> None:
        loaded = source.read() if dim is None else source.read(dim, start, length)
        layer.weight.data.narrow(0, row_offset, loaded.shape[0]).copy_(loaded)

    def finish(self, layer: nn.Module) -> None:
        packed = cpu_gemm.pack_weight(layer.weight) if self.pack else None
        if packed is not None:  # the packed copy replaces the plain one
            layer.packed_weight = packed
            layer.weight = None

    def apply(self, layer, x):
        if layer.packed_weight is not None:
            return cpu_gemm.linear(x, None, layer.packed_weight)
        if self.row_pairs:
            return _linear_two_rows_at_a_time(x, layer.weight)
        return F.linear(x, layer.weight)

    @property
    def can_read_rows(self) -> bool:
        return not self.pack  # oneDNN's packed layout cannot be read by rows

    def read_rows(self, layer, row_ids):
        return F.embedding(row_ids, layer.weight)


class NativeBf16Method(DenseMethod):
    """A bfloat16 weight multiplied by the native CPU kernel: loaded as a plain weight, then rearranged into the
    kernel's 64-row blocks (which replace it; rows padded with zeros to a multiple of 64). Activations of any
    dtype are widened to float32 for the product (exact for bfloat16 ones) and the result cast back, so
    eagerly it rounds where oneDNN's bfloat16 product does; each row is reduced alike whatever the batch."""

    name = "bf16 (native)"

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        if dtype != torch.bfloat16 or not native_kernels.available() or torch.device(device).type != "cpu":
            raise ValueError(f"the native bfloat16 product needs bfloat16 weights on a CPU with the native kernels; got {dtype} on {device}")
        super().__init__(dtype, device)
        self.out_features = 0

    def finish(self, layer: nn.Module) -> None:
        weight = layer.weight.data
        self.out_features, in_features = weight.shape
        padded = -(-self.out_features // native_kernels.BF16_BLOCK_ROWS) * native_kernels.BF16_BLOCK_ROWS
        if padded != self.out_features:  # zero rows: their outputs are sliced away
            weight = F.pad(weight, (0, 0, 0, padded - self.out_features))
        layer.weight = None
        layer.register_buffer("bf16_weight", native_kernels.pack_bf16(weight), persistent=False)

    def apply(self, layer, x):
        rows = x.reshape(-1, x.shape[-1]).float()
        y = native_kernels.bf16_matmul(rows, layer.bf16_weight)
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    @property
    def can_read_rows(self) -> bool:
        return True

    def read_rows(self, layer, row_ids):
        return native_kernels.unpack_bf16_rows(layer.bf16_weight, row_ids).to(self.dtype)


def _linear_two_rows_at_a_time(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    if count == 0:
        return F.linear(x, weight)
    if count % 2:
        rows = F.pad(rows, (0, 0, 0, 1))
    out = torch.cat([F.linear(pair, weight) for pair in rows.split(2)])
    return out[:count].view(*x.shape[:-1], weight.shape[0])


class Int8Method(LinearMethod):
    """int8 weights with a scale per output row (quantized on load from the checkpoint's floats)."""

    name = "int8"

    def __init__(self, dtype: torch.dtype, device: torch.device, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(dtype, device)
        self.kernel = Int8Kernel(self.device, compute_dtype)

    def create_weights(self, layer, output_size, input_size) -> None:
        _start_staging(layer, output_size, input_size)  # Int8Channels/Int8Groups slices, until finish()
        layer.packed_int8 = None

    def load(self, layer, source, dim, start, length, row_offset) -> None:
        if dim == 1:  # a slice of the inputs: scale by the whole row, so every tensor-parallel split rounds alike
            channels = quantize_int8(source.read(), round_to=self.kernel.compute_dtype)
            channels = type(channels)(channels.q.narrow(1, start, length), channels.scale)
        else:
            weight = source.read() if dim is None else source.read(dim, start, length)
            channels = quantize_int8(weight, round_to=self.kernel.compute_dtype)
        layer.staging.append((row_offset, channels))

    def finish(self, layer) -> None:
        parts = _staged_slices(layer, "int8")
        q, scale = _joined([p.q for p in parts]), _joined([p.scale for p in parts])
        if any(getattr(p, "low", None) is not None for p in parts):  # minima (Q5_1, Q5_K), zero for parts without
            low = _joined([p.low if p.low is not None else torch.zeros_like(p.scale) for p in parts])
            packed = self.kernel.pack(Int8Groups(q, scale, low))
        else:
            packed = self.kernel.pack(type(parts[0])(q, scale))
        layer.packed_int8 = packed
        # Registered as buffers so they move and count like every other tensor of the module.
        layer.register_buffer("int8_weight", packed.weight, persistent=False)
        layer.register_buffer("int8_scale", packed.scale, persistent=False)
        layer.register_buffer("int8_low", packed.low, persistent=False)

    def apply(self, layer, x):
        return self.kernel.matmul(x, layer.packed_int8)

    def read_rows(self, layer, row_ids):
        return self.kernel.read_rows(layer.packed_int8, row_ids, self.dtype)


# GGUF types whose values fit int8 with one scale per group of inputs (that many), which int8 groups take exactly.
GGUF_INT8_GROUP_SIZES = {"Q8_0": INT8_GROUP_SIZE, "Q5_0": 32, "Q5_1": 32, "Q5_K": 32, "Q6_K": Q6_K_GROUP_SIZE}


class Int8GroupsMethod(Int8Method):
    """8-bit weights with a scale per group of inputs, read as a GGUF tensor stores them (not re-rounded): Q8_0
    (groups of 32), Q5_0 (5-bit values less 16, groups of 32), Q5_1 and Q5_K (5-bit values and a minimum per 32)
    or Q6_K (6-bit values, groups of 16), multiplied in float32 by the native CPU kernel: the same weights as the
    dequantized table, a quarter of the memory. A fused layer may mix types of one group size (q/k Q5_0 and v
    Q8_0). Only for checkpoint tensors stored so (`QuantizationPlan` sees to it)."""

    def __init__(self, dtype: torch.dtype, device: torch.device, stored_as: str | tuple[str, ...] = "Q8_0") -> None:
        super().__init__(dtype, device, torch.float32)
        self.stored_as = (stored_as,) if isinstance(stored_as, str) else tuple(sorted(stored_as))
        unknown = [t for t in self.stored_as if t not in GGUF_INT8_GROUP_SIZES]
        if unknown or not self.stored_as:
            raise ValueError(f"stored_as={stored_as!r}: expected GGUF types among {', '.join(GGUF_INT8_GROUP_SIZES)}")
        group_sizes = {GGUF_INT8_GROUP_SIZES[t] for t in self.stored_as}
        if len(group_sizes) != 1:
            raise ValueError(f"stored_as={stored_as!r} mixes groups of {sorted(group_sizes)} inputs; one layer has one")
        self.group_size = group_sizes.pop()
        self.name = "+".join(t.lower() for t in self.stored_as)
        if not self.kernel.supports_groups:
            raise ValueError(f"{self.name} weights kept as stored need the native CPU kernels, unavailable on {self.device}")

    def create_weights(self, layer, output_size, input_size) -> None:
        if input_size % self.group_size:
            raise ValueError(f"{self.name} needs input features divisible by {self.group_size}; {layer.__class__.__name__} has {input_size}")
        super().create_weights(layer, output_size, input_size)

    def load(self, layer, source, dim, start, length, row_offset) -> None:
        read_groups = getattr(source, "read_int8_groups", None)
        groups = read_groups(dim, start, length) if read_groups is not None else None
        if groups is None or getattr(source, "type_name", self.stored_as[0]) not in self.stored_as:
            raise ValueError(
                f"{getattr(source, 'name', 'a tensor')} is not a {'/'.join(self.stored_as)} tensor read on its groups' "
                f"boundaries; it cannot be kept as {self.name}"
            )
        layer.staging.append((row_offset, groups))


class Int4Method(LinearMethod):
    """4-bit weights in groups of `group_size` along the input, each with a scale and a zero.

    Slices are gathered as `Int4Groups` while the checkpoint is read (from a GGUF Q4_0/Q4_1/Q4_K tensor as it is
    stored, or quantized from floats), then packed once for the kernel when the last slice is in.
    """

    name = "int4"

    def __init__(self, dtype: torch.dtype, device: torch.device, group_size: int, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(dtype, device)
        self.group_size = group_size
        self.kernel = Int4Kernel(self.device, compute_dtype)

    def create_weights(self, layer, output_size, input_size) -> None:
        self.group_size = self._group_size_for(layer, input_size)
        _start_staging(layer, output_size, input_size)  # Int4Groups slices, until finish()
        layer.packed_int4 = None

    def _group_size_for(self, layer: nn.Module, input_size: int) -> int:
        """The requested group size, or a smaller one where the layer's inputs are not a multiple of it.
        A tensor-parallel split that would cut a group in two is refused instead."""
        if input_size % self.group_size == 0:
            return self.group_size
        tp_size = getattr(getattr(layer, "tp", None), "size", 1)
        split_inputs = getattr(layer, "input_size_per_rank", None) == input_size and tp_size > 1
        if split_inputs and (input_size * tp_size) % self.group_size == 0:
            raise ValueError(
                f"int4 groups of {self.group_size} do not divide this rank's {input_size} input features of "
                f"{layer.__class__.__name__} (tensor_parallel_size={tp_size} would cut groups in two); choose a "
                f"group size that divides {input_size} or another tensor-parallel size"
            )
        smaller = [size for size in INT4_GROUP_SIZES if size < self.group_size and input_size % size == 0]
        if not smaller:
            raise ValueError(f"int4 needs input features divisible by {min(INT4_GROUP_SIZES)}; {layer.__class__.__name__} has {input_size}")
        return max(smaller)

    def load(self, layer, source, dim, start, length, row_offset) -> None:
        groups = None
        read_groups = getattr(source, "read_int4_groups", None)
        if read_groups is not None:
            groups = read_groups(dim, start, length, self.group_size)  # None unless stored as such groups
        if groups is None:
            weight = source.read() if dim is None else source.read(dim, start, length)
            groups = quantize_int4(weight, self.group_size, round_to=self.kernel.compute_dtype)
        layer.staging.append((row_offset, groups))

    def finish(self, layer) -> None:
        parts = _staged_slices(layer, "int4")
        low = None
        if any(p.low is not None for p in parts):  # the stored minima where a part has them (GGUF's), else derived
            low = _joined([p.low if p.low is not None else p.zero - 8 * p.scale for p in parts])
        whole = Int4Groups(
            _joined([p.q for p in parts]), _joined([p.scale for p in parts]), _joined([p.zero for p in parts]), self.group_size, low
        )
        packed = self.kernel.pack(whole)
        layer.packed_int4 = packed
        # Registered as buffers so they move and count like every other tensor of the module.
        layer.register_buffer("int4_weight", packed.weight, persistent=False)
        layer.register_buffer("int4_scales_and_zeros", packed.scales_and_zeros, persistent=False)

    def apply(self, layer, x):
        return self.kernel.matmul(x, layer.packed_int4)

    @property
    def can_read_rows(self) -> bool:
        return self.kernel.can_read_rows

    def read_rows(self, layer, row_ids):
        return self.kernel.read_rows(layer.packed_int4, row_ids, self.dtype)

    def extra_repr(self) -> str:
        return f"int4 (groups of {self.group_size})"


class PartsMethod(LinearMethod):
    """A fused layer (q/k/v, gate/up) whose parts are stored in formats no one kernel takes together (in a GGUF
    Q4_K_M, some layers' q and k in Q4_K and v in Q6_K): each part keeps its own method and weight, on a module
    of its own (`layer.parts`), and their outputs are put side by side. Nothing is dequantized or re-rounded."""

    def __init__(self, dtype: torch.dtype, device: torch.device, methods: list[LinearMethod]) -> None:
        super().__init__(dtype, device)
        self.methods = methods
        self.name = " | ".join(method.name for method in methods)

    def create_weights(self, layer, output_size, input_size) -> None:
        sizes = getattr(layer, "local_sizes", None)  # a column-parallel layer's parts, on this rank
        if sizes is None or len(sizes) != len(self.methods) or sum(sizes) != output_size:
            raise ValueError(f"{self.name}: {layer.__class__.__name__} is not a fused layer of {len(self.methods)} parts")
        layer.parts = nn.ModuleList(nn.Module() for _ in self.methods)
        for part, method, size in zip(layer.parts, self.methods, sizes):
            method.create_weights(part, size, input_size)

    def load(self, layer, source, dim, start, length, row_offset) -> None:
        index = layer.local_offsets.index(row_offset)  # the part whose rows start there
        self.methods[index].load(layer.parts[index], source, dim, start, length, 0)

    def finish(self, layer) -> None:
        for part, method in zip(layer.parts, self.methods):
            method.finish(part)

    def apply(self, layer, x):
        return torch.cat([method.apply(part, x) for part, method in zip(layer.parts, self.methods)], dim=-1)

    @property
    def can_read_rows(self) -> bool:
        return False  # a fused layer is never an embedding table

    def read_rows(self, layer, row_ids):
        raise NotImplementedError("a fused layer of parts is not read by rows")


# Quantized methods gather a layer's slices as they are read (each a format with `q` [rows, cols]) and
# pack the whole once in finish(): a kernel's layout is not made slice by slice.
def _start_staging(layer: nn.Module, output_size: int, input_size: int) -> None:
    layer.output_size, layer.input_size = output_size, input_size
    layer.staging = []  # (row offset, slice) of each slice read


def _joined(slices: list[torch.Tensor]) -> torch.Tensor:
    """The slices one after the other; a lone slice as it is (no copy: an LM head's is tens of MB at load's peak)."""
    return slices[0] if len(slices) == 1 else torch.cat(slices)


def _staged_slices(layer: nn.Module, name: str) -> list:
    """The slices read, in row order (emptied from the layer), checked to make up its whole weight."""
    parts = [part for _, part in sorted(layer.staging, key=lambda item: item[0])]
    layer.staging = []
    shape = (sum(p.q.shape[0] for p in parts), parts[0].q.shape[1] if parts else 0)
    if shape != (layer.output_size, layer.input_size):
        raise ValueError(f"{name} weight of {shape} loaded for a layer of {(layer.output_size, layer.input_size)}")
    return parts
