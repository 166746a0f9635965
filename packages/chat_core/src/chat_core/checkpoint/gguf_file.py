"""A GGUF file opened once: its metadata as Python values and its tensors as lazy, sliceable reads."""

from __future__ import annotations

import functools
import mmap
import os
import sys
from collections.abc import Callable
from functools import cached_property
from typing import Any, TypeVar

import numpy as np
import torch

from chat_core.checkpoint.errors import CheckpointError
from chat_core.layers.weight_formats import INT8_GROUP_SIZE, Q6_K_GROUP_SIZE, Int4Groups, Int8Groups

# Block-quantized types keep each row of a weight as whole blocks, so a slice of rows reads only those rows.
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# Types that are 4-bit groups of 32 with a scale and a zero, readable as `Int4Groups` as they are stored (Q4_K:
# blocks of 256 holding 8 such groups, each with a 6-bit scale and minimum of the block's float16 d and dmin).
INT4_GROUP_TYPES = ("Q4_0", "Q4_1", "Q4_K")
INT4_GROUP_SIZE = 32
Groups = TypeVar("Groups", Int4Groups, Int8Groups)


class GGUFFile:
    """Reads a GGUF file with the `gguf` package, memory-mapped: nothing is dequantized until asked."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"GGUF file not found: {self.path}")
        try:
            self._reader = _plain_array_reader()(self.path, "r")
        except Exception as exc:  # the gguf package raises several types on a bad header
            raise CheckpointError(f"{self.path} is not a readable GGUF file: {exc}") from exc

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """Every key-value field of the file, as Python values (strings, numbers, lists)."""
        values: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                values[key] = field.contents()
            except Exception as exc:
                raise CheckpointError(f"{self.path}: cannot read metadata field {key!r}: {exc}") from exc
        return values

    @cached_property
    def tensors(self) -> dict[str, GGUFTensor]:
        return {t.name: GGUFTensor(self.path, t) for t in self._reader.tensors}

    def drop_pages(self, tensor: GGUFTensor) -> None:
        """Take a tensor's bytes, once read, out of this process's resident memory: the map would otherwise keep
        every page read until it is closed, as much memory again as the weights at the peak of a load. The
        pages stay in the OS page cache; a later read of the tensor maps them again."""
        memory_map = getattr(self._reader.data, "_mmap", None)  # numpy.memmap's mmap.mmap
        if memory_map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE  # madvise takes whole pages
        end = min(tensor.data_offset + tensor.num_bytes, len(memory_map))
        if end > start:
            memory_map.madvise(mmap.MADV_DONTNEED, start, end - start)


@functools.cache
def _plain_array_reader() -> type:
    """`gguf.GGUFReader`, made fast on the metadata of a large vocabulary (SmolLM2's: 49,152 tokens, as many
    merges and scores), which it reads element by element, two array views and a recursive call each:
    - slices of a plain array view of its memory map instead of the `numpy.memmap` (whose bookkeeping on each
      small slice made opening SmolLM2 take 2.3 s; 0.6-1.0 s after);
    - arrays of numbers as one view each, and arrays of strings as one view per string with their lengths read
      as integers (0.1-0.2 s after). `contents()` gives the same values (tested against the stock reader);
      only indexing one element of an array of numbers (`contents(i)`), which nothing here does, would differ.
    Same file, same laziness: the tensors are not read."""
    import gguf

    class PlainArrayGGUFReader(gguf.GGUFReader):
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
            dtype = np.dtype(dtype)
            values = self._plain()[offset : offset + dtype.itemsize * int(count)].view(dtype)[: int(count)]
            return values.view(values.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

        def _plain(self) -> np.ndarray:
            plain = self.__dict__.get("_plain_view")
            if plain is None:
                plain = self._plain_view = self.data.view(np.ndarray)
            return plain

        def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[Any]]:
            array = gguf.GGUFValueType.ARRAY
            if raw_type != array or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            item_type, length = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            item, count, start = gguf.GGUFValueType(int(item_type[0])), int(length[0]), orig_offs + 12
            types = [array, item] if count else [array]
            scalar = self.gguf_scalar_to_np.get(item)
            if scalar is not None:  # one view of every element
                values = self._get(start, scalar, count)
                return 12 + int(values.nbytes), [item_type, length, values], [2] if count else [], types
            if item != gguf.GGUFValueType.STRING:  # arrays of arrays: element by element, as the stock reader
                return super()._get_field_parts(orig_offs, raw_type)
            plain, parts, data, offset = self._plain(), [item_type, length], [], start
            memory = memoryview(plain)
            for _ in range(count):  # each string: an 8-byte length, then its bytes
                size = int.from_bytes(memory[offset : offset + 8], sys.byteorder)  # "I": the host's order
                data.append(len(parts))
                parts.append(plain[offset + 8 : offset + 8 + size])
                offset += 8 + size
            return offset - orig_offs, parts, data, types

    return PlainArrayGGUFReader


def _q4_k_groups(raw: np.ndarray) -> Int4Groups:
    """Q4_K blocks [rows, blocks * 144 bytes] as groups of 32: w = (d sc) q - (dmin m), sc and m the group's 6-bit
    scale and minimum (unpacked by `gguf`), each product exact in float32, as `gguf` dequantizes them."""
    from gguf.quants import Q4_K

    rows = raw.shape[0]
    blocks = raw.reshape(-1, 144)  # d, dmin (float16), 12 bytes of scales and minima, 128 bytes of 4-bit values
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [blocks, 1]
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16].copy())  # [blocks, 8] each
    scale = (d * sc.astype(np.float32)).reshape(rows, -1)  # [rows, groups]
    low = -(dmin * m.astype(np.float32)).reshape(rows, -1)  # the value of q = 0
    packed = blocks[:, 16:].reshape(-1, 4, 1, 32)  # 4 x 32 bytes: values j (low nibbles), then j + 32 (high)
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=2).reshape(rows, -1)
    return Int4Groups(torch.from_numpy(q), torch.from_numpy(scale), torch.from_numpy(low + 8 * scale), INT4_GROUP_SIZE, torch.from_numpy(low))


def _q5_groups(raw: np.ndarray, with_minimum: bool) -> Int8Groups:
    """Q5_0 blocks [rows, groups * 22 bytes] as int8 groups of 32, w = d (q - 16), or Q5_1 ones (24 bytes), w = d q + m:
    q 5 bits (the low 4 in nibbles, value j and j + 16 in byte j; the fifth in a 32-bit mask), d and m the
    group's float16 numbers, as `gguf` dequantizes them."""
    rows = raw.shape[0]
    header = 4 if with_minimum else 2  # float16 d (and m), then 4 bytes of high bits, 16 bytes of low nibbles
    blocks = raw.reshape(-1, header + 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [groups, 1]
    high = (blocks[:, header : header + 4].copy().view(np.uint32) >> np.arange(32, dtype=np.uint32)) & 1  # [groups, 32]
    low_bits = (blocks[:, header + 4 :].reshape(-1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)) & 0x0F
    q = (low_bits.reshape(-1, 32) | (high.astype(np.uint8) << 4)).astype(np.int8)
    if not with_minimum:
        return Int8Groups(torch.from_numpy((q - np.int8(16)).reshape(rows, -1)), torch.from_numpy(d.reshape(rows, -1)))
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return Int8Groups(torch.from_numpy(q.reshape(rows, -1)), torch.from_numpy(d.reshape(rows, -1)), torch.from_numpy(m.reshape(rows, -1)))


def _q5_k_groups(raw: np.ndarray) -> Int8Groups:
    """Q5_K blocks [rows, blocks * 176 bytes] as int8 groups of 32: w = (d sc) q - (dmin m) as in Q4_K, q 5 bits (the
    fifth of group g's value j is bit g of byte j of 32 bytes of high bits), as `gguf` dequantizes them."""
    from gguf.quants import Q4_K

    rows = raw.shape[0]
    blocks = raw.reshape(-1, 176)  # d, dmin, 12 bytes of scales and minima, 32 of high bits, 128 of low nibbles
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [blocks, 1]
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16].copy())  # the same packing as Q4_K's
    high = (blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1  # [blocks, 8, 32]
    low_bits = (blocks[:, 48:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    q = (low_bits.reshape(-1, 8, 32) | (high << 4)).astype(np.int8)
    scale = (d * sc.astype(np.float32)).reshape(rows, -1)
    low = -(dmin * m.astype(np.float32)).reshape(rows, -1)
    return Int8Groups(torch.from_numpy(q.reshape(rows, -1)), torch.from_numpy(scale), torch.from_numpy(low))


def _q6_k_groups(raw: np.ndarray) -> Int8Groups:
    """Q6_K blocks [rows, blocks * 210 bytes] as int8 groups of 16: w = (d sc) q, q = 6 bits - 32, sc an int8 per 16,
    d the block's float16; the bits are unpacked and the scales multiplied as `gguf` dequantizes them."""
    rows = raw.shape[0]
    blocks = raw.reshape(-1, 210)  # 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, float16 d
    low_bits = (blocks[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    high_bits = (blocks[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
    q = (low_bits.reshape(-1, 8, 32) | (high_bits.reshape(-1, 8, 32) << 4)).astype(np.int8) - np.int8(32)
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)  # [blocks, 1]
    scale = d * blocks[:, 192:208].copy().view(np.int8).astype(np.float32)  # [blocks, 16]
    return Int8Groups(torch.from_numpy(q.reshape(rows, -1)), torch.from_numpy(scale.reshape(rows, -1)))


class GGUFTensor:
    """One tensor of a GGUF file, in PyTorch's layout (rows = output features), read lazily.

    `row_order` optionally maps each row of the returned tensor to a row of the file, which is how
    llama.cpp's rotary permutation of q/k weights is undone without reading the whole weight.
    """

    def __init__(self, path: str, reader_tensor: Any, row_order: np.ndarray | None = None) -> None:
        import gguf

        self._path = path
        self._tensor = reader_tensor
        self._row_order = row_order
        self.name: str = reader_tensor.name
        self.type_name: str = reader_tensor.tensor_type.name
        if self.type_name not in SUPPORTED_GGUF_TYPES:
            raise CheckpointError(
                f"{path}: tensor {self.name!r} has GGUF type {self.type_name}; "
                f"supported types are {', '.join(SUPPORTED_GGUF_TYPES)}"
            )
        # GGUF lists dimensions innermost first; PyTorch outermost first.
        self.shape: tuple[int, ...] = tuple(int(d) for d in reversed(reader_tensor.shape.tolist()))
        self.data_offset, self.num_bytes = int(reader_tensor.data_offset), int(reader_tensor.n_bytes)  # in the file
        self._block_size = gguf.GGML_QUANT_SIZES[reader_tensor.tensor_type][0]

    def with_row_order(self, row_order: np.ndarray) -> GGUFTensor:
        return GGUFTensor(self._path, self._tensor, row_order)

    def read(self, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        """The tensor, or `length` entries from `start` along `dim`, dequantized to float32 (or its own float type)."""
        if dim is None:
            return self._rows(slice(None))
        length = self.shape[dim] - start if length is None else length
        if dim == 0:
            return self._rows(slice(start, start + length))
        if dim == 1 and len(self.shape) == 2:
            if start % self._block_size == 0 and length % self._block_size == 0:
                return self._rows(slice(None), column_blocks=(start, length))
            return self._rows(slice(None)).narrow(1, start, length)
        return self._rows(slice(None)).narrow(dim, start, length)

    def read_int4_groups(self, dim: int | None, start: int = 0, length: int | None = None, group_size: int = 32) -> Int4Groups | None:
        """The slice as stored, for a Q4_0/Q4_1/Q4_K matrix read in groups of 32; None for any other type or group
        size, or a column slice that cuts the file's blocks."""
        if self.type_name not in INT4_GROUP_TYPES or group_size != INT4_GROUP_SIZE:
            return None
        if self.type_name == "Q4_K":
            return self._k_quant_groups(dim, start, length, INT4_GROUP_SIZE, _q4_k_groups)
        raw = self._raw_slice(dim, start, length)
        if raw is None:
            return None
        rows = raw.shape[0]
        blocks = np.ascontiguousarray(raw).reshape(rows, -1, 20 if self.type_name == "Q4_1" else 18)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [rows, groups]
        packed = blocks[..., 4:] if self.type_name == "Q4_1" else blocks[..., 2:]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)  # value j, then j + 16
        if self.type_name == "Q4_1":  # w = d q + m = d (q - 8) + (m + 8 d)
            low = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            return Int4Groups(torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(low + 8 * d), group_size, torch.from_numpy(low))
        # w = d (q - 8)
        return Int4Groups(torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(np.zeros_like(d)), group_size)

    def read_int8_groups(self, dim: int | None, start: int = 0, length: int | None = None) -> Int8Groups | None:
        """The slice as stored, for a Q8_0 matrix (int8 values, a scale per 32), a Q5_0 one (5-bit values less 16, a
        scale per 32), a Q5_1 or Q5_K one (5-bit values, a scale and a minimum per 32) or a Q6_K one (6-bit values,
        a scale per 16); None for any other type, or a column slice that cuts the groups."""
        if self.type_name == "Q6_K":
            return self._k_quant_groups(dim, start, length, Q6_K_GROUP_SIZE, _q6_k_groups)
        if self.type_name == "Q5_K":
            return self._k_quant_groups(dim, start, length, INT8_GROUP_SIZE, _q5_k_groups)
        if self.type_name not in ("Q8_0", "Q5_0", "Q5_1"):
            return None
        raw = self._raw_slice(dim, start, length)
        if raw is None:
            return None
        if self.type_name in ("Q5_0", "Q5_1"):
            return _q5_groups(np.ascontiguousarray(raw), with_minimum=self.type_name == "Q5_1")
        rows = raw.shape[0]
        blocks = np.ascontiguousarray(raw).reshape(rows, -1, 2 + INT8_GROUP_SIZE)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [rows, groups]
        q = blocks[..., 2:].copy().view(np.int8).reshape(rows, -1)
        return Int8Groups(torch.from_numpy(q), torch.from_numpy(d))

    def _k_quant_groups(self, dim: int | None, start: int, length: int | None, group: int, decode: Callable[[np.ndarray], Groups]) -> Groups | None:
        """A K-quant slice decoded from its stored blocks of 256 by `decode`; a slice of columns inside the blocks
        (a tensor-parallel rank's inputs) from whole rows, if it starts and ends on a group, else None."""
        raw = self._raw_slice(dim, start, length)
        if raw is not None:
            return decode(np.ascontiguousarray(raw))
        if dim != 1 or len(self.shape) != 2:
            return None
        length = self.shape[1] - start if length is None else length
        if start % group or length % group:
            return None
        return decode(np.ascontiguousarray(self._raw_rows(slice(None)))).columns(start, length)

    def _raw_slice(self, dim: int | None, start: int, length: int | None) -> np.ndarray | None:
        """The stored blocks of a 2-d slice; None for a column slice that does not start and end on a block."""
        if len(self.shape) != 2:
            return None
        if dim is None:
            return self._raw_rows(slice(None))
        if dim == 0:
            length = self.shape[0] - start if length is None else length
            return self._raw_rows(slice(start, start + length))
        length = self.shape[1] - start if length is None else length
        if start % self._block_size or length % self._block_size:
            return None
        return self._raw_rows(slice(None), column_blocks=(start, length))

    def _raw_rows(self, rows: slice, column_blocks: tuple[int, int] | None = None) -> np.ndarray:
        """The stored bytes of `rows` (in the row order), optionally only the blocks of some columns."""
        data = self._tensor.data  # numpy memmap, one row per output feature
        raw = data[self._row_order[rows]] if self._row_order is not None else data[rows]
        if column_blocks is not None:
            start, length = column_blocks
            bytes_per_block = raw.shape[-1] * self._block_size // self.shape[-1]
            first = start // self._block_size * bytes_per_block
            raw = raw[..., first : first + length // self._block_size * bytes_per_block]
        return raw

    def _rows(self, rows: slice, column_blocks: tuple[int, int] | None = None) -> torch.Tensor:
        from gguf.quants import dequantize

        raw = self._raw_rows(rows, column_blocks)
        values = dequantize(np.ascontiguousarray(raw), self._tensor.tensor_type)
        if not values.flags.writeable or not values.flags.c_contiguous:
            values = np.array(values, order="C")  # float types come back as views of the read-only map
        out_shape = (values.shape[0], -1) if len(self.shape) == 2 else (-1, *self.shape[1:])
        return torch.from_numpy(values).reshape(out_shape)

