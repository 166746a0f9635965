"""The weight-only quantized matrix products of each device, behind one small interface.

- int4: our own float32 kernel on CPUs with AVX-512 (`native_kernels`); elsewhere torch's tinygemm-style
  kernels, `_weight_int4pack_mm_for_cpu` on CPU and `_weight_int4pack_mm` on CUDA.
- int8: with a scale per output row (`Int8Channels`) or per 32 inputs (`Int8Groups`, GGUF's Q8_0): our own
  float32 kernel on such CPUs; otherwise, per row only, a Triton kernel on CUDA (`int8_matmul_triton`; torch's
  CUDA `_weight_int8pack_mm` is a thread per output), `_weight_int8pack_mm` on other CPUs where the build has
  it, else the weight converted on the fly (correct everywhere, fast nowhere).

Each kernel computes in its `compute_dtype`, which also holds its scales. float32 is what the native CPU
kernels compute in (and faster there than torch's kernels in bfloat16, which is all those are fast in: their
float32 versions are reference loops, 20-50x slower; CUDA's int4 kernel takes nothing else). Activations of
another dtype are cast around the product, so a float32 model keeps its residual stream, norms, attention and
logits in float32.

A kernel packs an `Int4Groups`/`Int8Channels`/`Int8Groups` into whatever layout it multiplies fastest, and can
give back rows of the weight (a tied embedding reads its rows from the LM head's packed weight: one copy).
`cpu_gemm` is the dense counterpart.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chat_core.layers import native_kernels
from chat_core.layers.weight_formats import Int4Groups, Int8Channels, Int8Groups


@dataclass(frozen=True)
class PackedInt4:
    weight: torch.Tensor  # the kernel's packed layout
    # torch's kernels: [groups, padded out_features, 2] (scale, zero) in the compute dtype;
    # the native kernel: [2, groups, padded out_features] (scale, low: w = scale q + low), float16 where that
    # holds them exactly (GGUF's), else float32.
    scales_and_zeros: torch.Tensor
    out_features: int
    in_features: int
    group_size: int


class Int4Kernel:
    """int4 x activations through torch's packed-int4 ops for one device type."""

    def __init__(self, device: torch.device, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.compute_dtype = torch.bfloat16 if self.on_cuda else compute_dtype
        self.native = native_available(device, self.compute_dtype)
        # CPU packs rows in blocks of up to 64; CUDA's tiles need a multiple of 8.
        self.row_multiple = 8 if self.on_cuda else 64

    def pack(self, groups: Int4Groups) -> PackedInt4:
        rows, cols = groups.q.shape
        padded = -(-rows // self.row_multiple) * self.row_multiple
        q, scale, zero = groups.q, groups.scale, groups.zero
        low = groups.low if groups.low is not None else zero - 8 * scale
        if padded != rows:  # zero rows: their outputs are sliced away
            q = F.pad(q, (0, 0, 0, padded - rows))
            scale, zero, low = (F.pad(t, (0, 0, 0, padded - rows)) for t in (scale, zero, low))
        if self.native:  # w = scale (q - 8) + zero = scale q + low
            scale_low = torch.stack((scale.t(), low.t())).float()
            halves = scale_low.half()  # GGUF's scales and minima are float16: half the bytes, read every step
            if torch.equal(halves.float(), scale_low):
                scale_low = halves
            return PackedInt4(native_kernels.pack_int4(q), scale_low.contiguous(), rows, cols, groups.group_size)
        scales_and_zeros = torch.stack((scale.t(), zero.t()), dim=-1).to(self.compute_dtype).contiguous().to(self.device)
        if self.on_cuda:
            nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).to(self.device)
            weight = torch.ops.aten._convert_weight_to_int4pack(nibbles, _inner_k_tiles(cols))
        elif (layout := _cpu_int4_layout()) is not None:
            weight = _cpu_pack(q, *layout)  # the op's own layout, with tensor ops: 10x faster than the op
        else:
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        return PackedInt4(weight, scales_and_zeros, rows, cols, groups.group_size)

    def matmul(self, x: torch.Tensor, packed: PackedInt4) -> torch.Tensor:
        rows = x.reshape(-1, packed.in_features).to(self.compute_dtype)
        if self.native:
            y = native_kernels.int4_matmul(rows, packed.weight, packed.scales_and_zeros, packed.group_size).to(x.dtype)
            if y.shape[-1] != packed.out_features:
                y = y[:, : packed.out_features].contiguous()  # an all-reduce takes contiguous tensors
            return y.view(*x.shape[:-1], packed.out_features)
        mm = torch.ops.aten._weight_int4pack_mm if self.on_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(rows, packed.weight, packed.group_size, packed.scales_and_zeros).to(x.dtype)
        if y.shape[-1] != packed.out_features:
            y = y[:, : packed.out_features].contiguous()  # an all-reduce takes contiguous tensors
        return y.view(*x.shape[:-1], packed.out_features)

    @property
    def can_read_rows(self) -> bool:
        return self.native or (not self.on_cuda and _cpu_int4_layout() is not None)

    def read_rows(self, packed: PackedInt4, row_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `row_ids` of the dequantized weight, [len(row_ids), in_features] (for a tied embedding)."""
        if self.native:
            q = native_kernels.unpack_int4_rows(packed.weight, row_ids, packed.in_features).float()
            scale, low = packed.scales_and_zeros.index_select(2, row_ids).float().transpose(1, 2).unsqueeze(-1)  # [rows, groups, 1]
            groups = q.view(len(row_ids), -1, packed.group_size)
            return (groups * scale + low).reshape(len(row_ids), packed.in_features).to(dtype)
        layout = _cpu_int4_layout()
        if self.on_cuda or layout is None:
            raise NotImplementedError("this device's packed int4 layout cannot be read back by rows")
        q = _cpu_unpack_rows(packed.weight, row_ids, packed.in_features, *layout).to(dtype)
        groups = q.view(len(row_ids), -1, packed.group_size) - 8
        scale_zero = packed.scales_and_zeros.index_select(1, row_ids)  # [groups, rows, 2]
        scale, zero = scale_zero[..., 0].t().unsqueeze(-1), scale_zero[..., 1].t().unsqueeze(-1)
        return (groups * scale + zero).view(len(row_ids), packed.in_features).to(dtype)


def _inner_k_tiles(in_features: int) -> int:
    """tinygemm's tiling of the reduction dimension: the largest that divides it."""
    for tiles in (8, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"int4 on CUDA needs in_features divisible by 32; got {in_features}")


def _cpu_unpack_rows(packed: torch.Tensor, row_ids: torch.Tensor, in_features: int, block: int, split: bool) -> torch.Tensor:
    """4-bit values of `row_ids` from the CPU pack: rows in blocks of `block`, each stored as [in, block/2] bytes.
    `split`: byte j holds rows j (low nibble) and j + block/2 (high); otherwise rows 2j and 2j + 1."""
    blocks = packed.view(-1, in_features, block // 2)
    within = row_ids % block
    if split:
        byte, high = within % (block // 2), within >= block // 2
    else:
        byte, high = within // 2, within % 2 == 1
    data = blocks[row_ids // block, :, byte]  # [rows, in]
    return torch.where(high.unsqueeze(1), data >> 4, data & 15)


def _cpu_pack(q: torch.Tensor, block: int, split: bool) -> torch.Tensor:
    """`_convert_weight_to_int4pack_for_cpu`'s layout for q [rows (a multiple of `block`), in] uint8."""
    rows, cols = q.shape
    if split:  # byte j of a row block: row j in the low nibble, row j + block/2 in the high one
        halves = q.view(rows // block, 2, block // 2, cols)
        low, high = halves[:, 0], halves[:, 1]
    else:  # byte j: rows 2j and 2j + 1
        pairs = q.view(rows // block, block // 2, 2, cols)
        low, high = pairs[:, :, 0], pairs[:, :, 1]
    return (low | high << 4).transpose(1, 2).contiguous().view(rows, cols // 2)


@functools.cache
def _cpu_int4_layout() -> tuple[int, bool] | None:
    """Which of the CPU kernel's packings this build uses (it depends on the vector ISA): found by packing a
    random probe with the op and reading it back. None if it is none of the known ones."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=generator)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
    rows = torch.arange(128)
    for layout in ((64, True), (32, True), (32, False), (64, False)):
        if torch.equal(_cpu_unpack_rows(packed, rows, 64, *layout).to(torch.int32), probe) and torch.equal(
            _cpu_pack(probe.to(torch.uint8), *layout), packed
        ):
            return layout
    return None


@dataclass(frozen=True)
class PackedInt8:
    weight: torch.Tensor  # [padded out_features, in_features] int8 in the kernel's layout
    # torch's kernels: [out_features] in the compute dtype (a scale per row); the native kernel: float32,
    # [padded out_features] (per row) or [in_features // group, padded out_features] (per group of inputs).
    scale: torch.Tensor
    out_features: int
    in_features: int
    low: torch.Tensor | None = None  # the native kernel's minima per group (as `scale`), where the format has them


class Int8Kernel:
    """int8 x activations: a scale per output row (`Int8Channels`), or per group of inputs (`Int8Groups`, which
    only the native kernel multiplies: see `supports_groups`)."""

    def __init__(self, device: torch.device, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        self.device = device
        self.compute_dtype = compute_dtype
        self.native = native_available(device, compute_dtype)

    @property
    def supports_groups(self) -> bool:
        return self.native

    def pack(self, weight: Int8Channels | Int8Groups) -> PackedInt8:
        rows, cols = weight.q.shape
        grouped = isinstance(weight, Int8Groups)
        if self.native:
            padded = -(-rows // native_kernels.INT8_BLOCK_ROWS) * native_kernels.INT8_BLOCK_ROWS
            q = F.pad(weight.q, (0, 0, 0, padded - rows))  # zero rows: their outputs are sliced away
            scale = F.pad(weight.scale.float().t() if grouped else weight.scale.float(), (0, padded - rows))
            low = getattr(weight, "low", None)
            low = F.pad(low.float().t(), (0, padded - rows)).contiguous() if low is not None else None
            return PackedInt8(native_kernels.pack_int8(q), scale.contiguous(), rows, cols, low)
        if grouped:
            raise ValueError(f"int8 with a scale per {weight.group_size} inputs needs the native CPU kernel; unavailable on {self.device}")
        return PackedInt8(weight.q.to(self.device).contiguous(), weight.scale.to(self.compute_dtype).to(self.device), rows, cols)

    def matmul(self, x: torch.Tensor, packed: PackedInt8) -> torch.Tensor:
        rows = x.reshape(-1, packed.in_features).to(self.compute_dtype)
        if self.native:
            y = native_kernels.int8_matmul(rows, packed.weight, packed.scale, packed.low)[:, : packed.out_features].contiguous()
        elif self.device.type == "cuda" and rows.dtype in (torch.bfloat16, torch.float16):
            from chat_core.layers.int8_matmul_triton import int8_weight_matmul  # triton: CUDA builds only

            y = int8_weight_matmul(rows, packed.weight, packed.scale)
        elif self.device.type == "cpu" and _has_int8pack_mm("cpu") and packed.in_features % 16 == 0:
            # (torch 2.13's CPU kernel reads out of bounds with bfloat16 rows of other widths: it crashes)
            y = torch.ops.aten._weight_int8pack_mm(rows, packed.weight, packed.scale)
        else:
            y = F.linear(rows, packed.weight.to(rows.dtype)) * packed.scale
        return y.to(x.dtype).view(*x.shape[:-1], packed.out_features)

    def read_rows(self, packed: PackedInt8, row_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `row_ids` of the dequantized weight, [len(row_ids), in_features]: exactly q x scale."""
        if not self.native:
            q, scale = packed.weight.index_select(0, row_ids), packed.scale.index_select(0, row_ids)
            return (q.to(dtype) * scale.unsqueeze(1)).to(dtype)
        q = native_kernels.unpack_int8_rows(packed.weight, row_ids)
        if packed.scale.dim() == 2:  # a scale (and a minimum) per group of inputs
            low = packed.low.index_select(1, row_ids).t() if packed.low is not None else None
            return Int8Groups(q, packed.scale.index_select(1, row_ids).t(), low).dequantize().to(dtype)
        return (q.float() * packed.scale.index_select(0, row_ids).unsqueeze(1)).to(dtype)


def native_available(device: torch.device, compute_dtype: torch.dtype) -> bool:
    """Whether products in `compute_dtype` on `device` go through `native_kernels` (float32 on CPU)."""
    return device.type == "cpu" and compute_dtype == torch.float32 and native_kernels.available()


@functools.cache
def _has_int8pack_mm(device_type: str) -> bool:
    """Whether this build multiplies int8 weights on this device type (one probe call)."""
    try:
        x = torch.ones(1, 32, dtype=torch.bfloat16, device=device_type)
        torch.ops.aten._weight_int8pack_mm(x, torch.ones(8, 32, dtype=torch.int8, device=device_type), torch.ones(8, dtype=torch.bfloat16, device=device_type))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True
