"""A tensor in a checkpoint that has not been read yet: layers ask for the slice their rank needs."""

from __future__ import annotations

from typing import Protocol

import torch

from chat_core.checkpoint.errors import CheckpointError


class TensorSource(Protocol):
    """One checkpoint tensor, in PyTorch's layout, read on demand (the whole, or a slice along one dim)."""

    shape: tuple[int, ...]

    def read(self, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor: ...


class SafetensorsTensor:
    """A tensor of a safetensors file; a slice reads only its own bytes.

    Each read maps the file anew (`safe_open`, well under a millisecond): the tensor it gives is a view of that
    mapping, which goes when the tensor does. One mapping held for the whole load would keep every page read
    resident until the end, as much memory again as the checkpoint (a float32 SmolLM2 quantized to int8 as it
    loaded peaked at 928 MiB that way)."""

    def __init__(self, path: str, name: str, shape: tuple[int, ...]) -> None:
        self.path, self.name, self.shape = path, name, shape

    def read(self, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        from safetensors import safe_open

        try:
            handle = safe_open(self.path, framework="pt")
        except Exception as exc:  # changed or removed since its tensors were listed
            raise CheckpointError(f"{self.path} is not a readable safetensors file: {exc}") from exc
        with handle:
            part = handle.get_slice(self.name)
            if dim is None:
                return part[:]
            length = self.shape[dim] - start if length is None else length
            index = [slice(None)] * len(self.shape)
            index[dim] = slice(start, start + length)
            return part[tuple(index)]


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
