"""Weight-only quantization formats, as plain tensors: what a quantized weight *is*, not how it is multiplied.

- `Int8Channels`: symmetric int8 with one scale per output row: w[n, k] = scale[n] * q[n, k].
- `Int8Groups`: int8 with a scale per group of inputs: w[n, k] = scale[n, k // group] * q[n, k] (+ low[n, k // group]
  where given): GGUF's Q8_0, Q5_0 and Q5_1 (groups of 32), Q6_K (16) and Q5_K (32, with minima) as stored.
- `Int4Groups`: 4-bit values in groups of `group_size` along the input: w[n, k] = scale[n, g] * (q[n, k] - 8) + zero[n, g]
  with g = k // group_size and q in 0..15 (the layout of torch's int4 kernels). GGUF's Q4_0 (zero = 0) and Q4_1
  (w = d q + m, so zero = m + 8 d) map onto it directly, so they are read into it without a round trip through floats.

`quantize_int8` / `quantize_int4` make them from float weights (min/max rounding, as torchao and gpt-fast do).
`round_to` lets the quantizer see scales as the kernel will (for example in bfloat16), so the rounding bound
holds for the weights that are actually multiplied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_GROUP_SIZES = (32, 64, 128)
INT8_GROUP_SIZE = 32  # GGUF Q8_0's block
Q6_K_GROUP_SIZE = 16  # GGUF Q6_K's groups of one scale (16 to a block of 256)


@dataclass(frozen=True)
class Int8Channels:
    q: torch.Tensor  # [rows, cols] int8
    scale: torch.Tensor  # [rows] float32

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.unsqueeze(1)


@dataclass(frozen=True)
class Int8Groups:
    q: torch.Tensor  # [rows, cols] int8
    scale: torch.Tensor  # [rows, cols // group_size] float32: GGUF's Q8_0 and Q5_0 (groups of 32), Q6_K (16)
    low: torch.Tensor | None = None  # [rows, cols // group_size] float32, the value of q = 0: Q5_1's and Q5_K's minima

    def __post_init__(self) -> None:
        rows, cols = self.q.shape
        if self.scale.dim() != 2 or self.scale.shape[0] != rows or not self.scale.shape[1] or cols % self.scale.shape[1]:
            raise ValueError(f"Int8Groups: scale {tuple(self.scale.shape)} does not divide q {tuple(self.q.shape)} into groups")
        if self.low is not None and self.low.shape != self.scale.shape:
            raise ValueError(f"Int8Groups: low {tuple(self.low.shape)} differs from scale {tuple(self.scale.shape)}")

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.q.shape
        weight = self.q.float().view(rows, -1, self.group_size) * self.scale.unsqueeze(-1)
        if self.low is not None:
            weight = weight + self.low.unsqueeze(-1)
        return weight.reshape(rows, cols)

    def columns(self, start: int, length: int) -> Int8Groups:
        """Inputs start..start+length (on group boundaries)."""
        first, count = start // self.group_size, length // self.group_size
        low = None if self.low is None else self.low[:, first : first + count].contiguous()
        return Int8Groups(self.q[:, start : start + length].contiguous(), self.scale[:, first : first + count].contiguous(), low)


@dataclass(frozen=True)
class Int4Groups:
    q: torch.Tensor  # [rows, cols] uint8, values 0..15
    scale: torch.Tensor  # [rows, cols // group_size] float32
    zero: torch.Tensor  # [rows, cols // group_size] float32: the value of q = 8
    group_size: int
    # The value of q = 0, where the source stores it (GGUF's minima): kernels that take w = scale q + low use it as
    # it is, rather than zero - 8 scale, which float32 may round differently.
    low: torch.Tensor | None = None

    def __post_init__(self) -> None:
        rows, cols = self.q.shape
        shapes_fit = self.scale.shape == (rows, cols // self.group_size) and self.zero.shape == self.scale.shape
        if cols % self.group_size or not shapes_fit or (self.low is not None and self.low.shape != self.scale.shape):
            raise ValueError(
                f"Int4Groups: q {tuple(self.q.shape)}, scale {tuple(self.scale.shape)}, zero {tuple(self.zero.shape)} "
                f"and low {None if self.low is None else tuple(self.low.shape)} do not fit group_size={self.group_size}"
            )

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.q.shape
        groups = self.q.view(rows, -1, self.group_size).float() - 8
        return (self.scale.unsqueeze(-1) * groups + self.zero.unsqueeze(-1)).view(rows, cols)

    def columns(self, start: int, length: int) -> Int4Groups:
        """Inputs start..start+length (on group boundaries)."""
        first, count = start // self.group_size, length // self.group_size
        low = None if self.low is None else self.low[:, first : first + count].contiguous()
        return Int4Groups(
            self.q[:, start : start + length].contiguous(), self.scale[:, first : first + count].contiguous(),
            self.zero[:, first : first + count].contiguous(), self.group_size, low,
        )  # fmt: skip

    def narrow_rows(self, start: int, length: int) -> Int4Groups:
        low = None if self.low is None else self.low.narrow(0, start, length)
        return Int4Groups(
            self.q.narrow(0, start, length), self.scale.narrow(0, start, length), self.zero.narrow(0, start, length), self.group_size, low
        )


# Rows quantized at a time: each row's numbers depend on that row alone, so a large weight (a 128k x 2048 LM head
# is 1 GiB in float32) is quantized a slice at a time, with float temporaries of a slice, not of the whole.
QUANTIZE_ROWS_AT_ONCE = 2048


def quantize_int8(weight: torch.Tensor, round_to: torch.dtype = torch.float32) -> Int8Channels:
    """Symmetric per-row int8: the largest |w| of a row maps to 127."""
    rows = weight.shape[0]
    q, scale = torch.empty(weight.shape, dtype=torch.int8, device=weight.device), torch.empty(rows, device=weight.device)
    for start in range(0, rows, QUANTIZE_ROWS_AT_ONCE):
        w = weight[start : start + QUANTIZE_ROWS_AT_ONCE].float()
        part = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        part = part.to(round_to).float()  # quantize against the scale the kernel will use
        scale[start : start + len(part)] = part
        q[start : start + len(part)] = torch.div(w, part.unsqueeze(1)).round_().clamp_(-128, 127)
    return Int8Channels(q, scale)


def quantize_int4(weight: torch.Tensor, group_size: int, round_to: torch.dtype = torch.float32) -> Int4Groups:
    """Asymmetric 4-bit groups along the input: each group's min and max span the 16 levels."""
    rows, cols = weight.shape
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size={group_size} is not supported; expected one of {INT4_GROUP_SIZES}")
    if cols % group_size:
        raise ValueError(f"int4 group_size={group_size} does not divide the {cols} input features of a weight")
    device = weight.device
    q = torch.empty(rows, cols, dtype=torch.uint8, device=device)
    scale, zero = (torch.empty(rows, cols // group_size, device=device) for _ in range(2))
    for start in range(0, rows, QUANTIZE_ROWS_AT_ONCE):
        groups = weight[start : start + QUANTIZE_ROWS_AT_ONCE].float().view(-1, cols // group_size, group_size)
        end = start + groups.shape[0]
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        part_scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(round_to).float()
        # Round the zero as the kernel will, then fit q to the rounded scale and zero.
        part_zero = (low + 8 * part_scale).to(round_to).float()
        scale[start:end], zero[start:end] = part_scale, part_zero
        part_q = torch.sub(groups, part_zero.unsqueeze(-1)).div_(part_scale.unsqueeze(-1)).add_(8).round_().clamp_(0, 15)
        q[start:end] = part_q.view(-1, cols)
    return Int4Groups(q, scale, zero, group_size)
