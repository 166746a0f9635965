"""A tensor in a checkpoint that has not been read yet: layers ask for the slice their rank needs."""

from __future__ import annotations

from typing import Protocol

import torch


class TensorSource(Protocol):
    """One checkpoint tensor, in PyTorch's layout, read on demand (the whole, or a slice along one dim)."""

    shape: tuple[int, ...]

    def read(self, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor: ...


class SafetensorsTensor:
    """A tensor of a memory-mapped safetensors file; a slice reads only its own bytes."""

    def __init__(self, handle: object, name: str) -> None:
        self._slice = handle.get_slice(name)  # type: ignore[attr-defined]
        self.shape: tuple[int, ...] = tuple(self._slice.get_shape())

    def read(self, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        if dim is None:
            return self._slice[:]
        length = self.shape[dim] - start if length is None else length
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._slice[tuple(index)]


class InMemoryTensor:
    """A tensor already in memory, behind the same interface (tests, and weights built by hand)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor
        self.shape: tuple[int, ...] = tuple(tensor.shape)

    def read(self, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        if dim is None:
            return self._tensor
        length = self.shape[dim] - start if length is None else length
        return self._tensor.narrow(dim, start, length)
