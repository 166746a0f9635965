"""A step's input arrays, packed into one host buffer and moved to the device in one copy.

The runner fills numpy arrays (token ids, positions, slots, block tables, sampling settings); `stage`
lays them out in a single byte buffer and returns device tensors that are views of one device copy of
it. On CUDA the host buffer is pinned and reused from step to step, so the copy is asynchronous and
nothing is allocated on the host per step; before it is refilled, `stage` waits for the previous copy
out of it (an event recorded behind that copy: usually long done, since a sampling step ends by reading
its tokens back, but a prefill chunk that samples nothing does not).
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 8  # every array starts on an 8-byte boundary, so int64 views are aligned


class InputStaging:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: torch.Tensor | None = None  # CUDA: the reusable host buffer
        self._copied: torch.cuda.Event | None = None  # CUDA: recorded behind the last copy out of it

    def stage(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Device tensors with the contents, dtypes and shapes of `arrays` (int64, int32, float32 or bool)."""
        layout: list[tuple[str, np.ndarray, int]] = []
        size = 0
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            layout.append((name, array, size))
            size += -(-array.nbytes // _ALIGN) * _ALIGN
        host = self._host_buffer(max(size, _ALIGN))
        host_bytes = host.numpy()
        for _, array, offset in layout:
            host_bytes[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8)
        if self.device.type == "cpu":
            device_bytes = host
        else:
            device_bytes = host[:size].to(self.device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(self.device))  # the copy's stream, on its device
        return {
            name: device_bytes[offset : offset + array.nbytes].view(_TORCH_DTYPES[array.dtype]).view(array.shape)
            for name, array, offset in layout
        }

    def _host_buffer(self, size: int) -> torch.Tensor:
        if self.device.type == "cpu":
            return torch.empty(size, dtype=torch.uint8)  # the step's tensors are views of it: a fresh one each step
        if self._copied is not None:
            self._copied.synchronize()
        if self._pinned is None or self._pinned.numel() < size:
            self._pinned = torch.empty(max(size, 2 * (0 if self._pinned is None else self._pinned.numel())), dtype=torch.uint8, pin_memory=True)
        return self._pinned


_TORCH_DTYPES = {
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.bool_): torch.bool,
}
