"""The weight-only quantized matrix products of each device, behind one small interface.

- int4: torch's tinygemm-style kernels: `_weight_int4pack_mm_for_cpu` on CPU, `_weight_int4pack_mm` on CUDA.
- int8: `_weight_int8pack_mm` (per-output-channel scales) where the build has it for the device; otherwise
  the weight is converted on the fly (correct everywhere, fast nowhere).

Each kernel computes in its `compute_dtype`, which also holds its scales: bfloat16 by default, the only
dtype in which these kernels are fast (on CPU the float32 versions are reference loops, 20-50x slower;
CUDA's int4 kernel takes nothing else). Activations of another dtype are cast around the product, so a
float32 model keeps its residual stream, norms, attention and logits in float32. `compute_dtype=float32`
(CPU) multiplies by exactly the stored weights, for verification.

A kernel packs an `Int4Groups`/`Int8Channels` into whatever layout it multiplies fastest, and can give back
rows of the weight (a tied embedding reads its rows from the LM head's packed weight: one copy).
`cpu_gemm` is the dense counterpart.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chat_core.layers.weight_formats import Int4Groups, Int8Channels


@dataclass(frozen=True)
class PackedInt4:
    weight: torch.Tensor  # the kernel's packed layout
    scales_and_zeros: torch.Tensor  # [in_features // group_size, padded out_features, 2] in the activation dtype
    out_features: int
    in_features: int
    group_size: int


class Int4Kernel:
    """int4 x activations through torch's packed-int4 ops for one device type."""

    def __init__(self, device: torch.device, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.compute_dtype = torch.bfloat16 if self.on_cuda else compute_dtype
        # CPU packs rows in blocks of up to 64; CUDA's tiles need a multiple of 8.
        self.row_multiple = 8 if self.on_cuda else 64

    def pack(self, groups: Int4Groups) -> PackedInt4:
        rows, cols = groups.q.shape
        padded = -(-rows // self.row_multiple) * self.row_multiple
        q, scale, zero = groups.q, groups.scale, groups.zero
        if padded != rows:  # zero rows: their outputs are sliced away
            q = F.pad(q, (0, 0, 0, padded - rows))
            scale, zero = F.pad(scale, (0, 0, 0, padded - rows)), F.pad(zero, (0, 0, 0, padded - rows))
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
        mm = torch.ops.aten._weight_int4pack_mm if self.on_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(rows, packed.weight, packed.group_size, packed.scales_and_zeros).to(x.dtype)
        if y.shape[-1] != packed.out_features:
            y = y[:, : packed.out_features]
        return y.view(*x.shape[:-1], packed.out_features)

    @property
    def can_read_rows(self) -> bool:
        return not self.on_cuda and _cpu_int4_layout() is not None

    def read_rows(self, packed: PackedInt4, row_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `row_ids` of the dequantized weight, [len(row_ids), in_features] (for a tied embedding)."""
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


class Int8Kernel:
    """int8 (per-output-channel scales) x activations."""

    def __init__(self, device: torch.device, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        self.device = device
        self.compute_dtype = compute_dtype

    def pack(self, channels: Int8Channels) -> tuple[torch.Tensor, torch.Tensor]:
        return channels.q.to(self.device).contiguous(), channels.scale.to(self.compute_dtype).to(self.device)

    def matmul(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, q.shape[1]).to(self.compute_dtype)
        if _has_int8pack_mm(self.device.type):
            y = torch.ops.aten._weight_int8pack_mm(rows, q, scale)
        else:
            y = F.linear(rows, q.to(rows.dtype)) * scale
        return y.to(x.dtype).view(*x.shape[:-1], q.shape[0])

    @staticmethod
    def read_rows(q: torch.Tensor, scale: torch.Tensor, row_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (q.index_select(0, row_ids).to(dtype) * scale.index_select(0, row_ids).unsqueeze(1)).to(dtype)


@functools.cache
def _has_int8pack_mm(device_type: str) -> bool:
    """Whether this build multiplies int8 weights on this device type (one probe call)."""
    try:
        x = torch.ones(1, 32, dtype=torch.bfloat16, device=device_type)
        torch.ops.aten._weight_int8pack_mm(x, torch.ones(8, 32, dtype=torch.int8, device=device_type), torch.ones(8, dtype=torch.bfloat16, device=device_type))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True
