"""Moving dicts of tensors and plain values between ranks: the transport of the control plane.

A dict is split into metadata (its keys in order, its plain values, and for each tensor a `TensorMeta`)
and its tensors. The metadata travels pickled, in one message over the group's gloo CPU group; then each
non-empty tensor travels as raw bytes (a `uint8` view, so every dtype works on gloo, which rejects e.g.
int16), over the CPU group if it lives on the CPU and over the device group otherwise. Receivers allocate
from the metadata and rebuild a dict equal to the sender's, in the same key order.

Tensors may sit at the top level or nested inside lists, tuples and dicts; every other value must be
plain (None, bool, int, float, str, bytes, or lists, tuples and dicts of them), so that nothing
device-bound is ever pickled. `requires_grad` is not carried. Receivers' tensors live on the CPU or on
their group's device.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from chat_distributed.parallel_state import GroupCoordinator, get_world_group


class CommunicationError(RuntimeError):
    """A transfer failed: a peer died, hung past the groups' timeout, or could not send its dict."""


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver needs to allocate one tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    device_type: str


@dataclass(frozen=True)
class CommunicationStats:
    """What this process sent or received through this module since the last reset."""

    metadata_messages: int = 0  # pickled metadata messages (broadcast, sent or received)
    metadata_bytes: int = 0
    tensor_messages: int = 0  # tensor broadcasts, sends and receives (empty tensors are not sent)
    tensor_bytes: int = 0

    @property
    def collectives(self) -> int:
        return self.metadata_messages + self.tensor_messages

    @property
    def bytes_moved(self) -> int:
        return self.metadata_bytes + self.tensor_bytes


class _Counters:
    # Plain integer adds: cheap enough to leave on in the hot path.
    __slots__ = ("metadata_messages", "metadata_bytes", "tensor_messages", "tensor_bytes")

    def __init__(self) -> None:
        self.metadata_messages = self.metadata_bytes = self.tensor_messages = self.tensor_bytes = 0


_counters = _Counters()


def communication_stats() -> CommunicationStats:
    """A snapshot of this process's counters."""
    return CommunicationStats(
        _counters.metadata_messages, _counters.metadata_bytes, _counters.tensor_messages, _counters.tensor_bytes
    )


def reset_communication_stats() -> None:
    _counters.__init__()


@dataclass(frozen=True)
class _SenderFailed:
    """Sent in place of metadata when the sender could not split its dict, so receivers fail instead of waiting."""

    message: str


def broadcast_tensor_dict(
    tensor_dict: dict[str, Any] | None = None, src: int = 0, group: GroupCoordinator | None = None
) -> dict[str, Any]:
    """Send `tensor_dict` from global rank `src` to every rank of `group` (default: the world).

    On `src`, returns `tensor_dict` itself; elsewhere pass None and get an equal dict back. With no process
    group or a group of one, returns `tensor_dict` unchanged (the same object) after checking that every
    value could be sent, so local and distributed code take one path.
    """
    group = _resolve_group(group)
    if group is None or group.size == 1:
        if tensor_dict is not None:
            _split(tensor_dict, tensors=[])
        return tensor_dict  # type: ignore[return-value]
    _check_member(src, group, "src")
    is_sender = group.global_rank == src
    with _naming_failures(f"broadcast_tensor_dict from rank {src} over ranks {list(group.ranks)}"):
        if is_sender:
            tensors = _send_metadata(tensor_dict, group, dst=None, src=src)
        else:
            metadata = _receive_metadata(group, src, broadcast=True)
            tensors = _allocate(metadata.tensors, group, src)
        works = [
            dist.broadcast(buffer, src=src, group=group_for, async_op=True)
            for buffer, group_for in _tensor_buffers(tensors, group)
        ]
        _wait_all(works)
    if is_sender:
        return tensor_dict  # type: ignore[return-value]
    return _rebuild(metadata.structure, iter(tensors))


def send_tensor_dict(tensor_dict: dict[str, Any], dst: int, group: GroupCoordinator | None = None) -> None:
    """Send `tensor_dict` to global rank `dst` of `group` (default: the world), which calls `recv_tensor_dict`."""
    group = _require_group(group, "send_tensor_dict")
    _check_member(dst, group, "dst")
    if dst == group.global_rank:
        raise ValueError(f"dst={dst} is this rank; send_tensor_dict needs another rank of {list(group.ranks)}")
    with _naming_failures(f"send_tensor_dict from rank {group.global_rank} to rank {dst}"):
        tensors = _send_metadata(tensor_dict, group, dst=dst, src=group.global_rank)
        works = [dist.isend(buffer, dst=dst, group=group_for) for buffer, group_for in _tensor_buffers(tensors, group)]
        _wait_all(works)


def recv_tensor_dict(src: int, group: GroupCoordinator | None = None) -> dict[str, Any]:
    """Receive the dict that global rank `src` sends with `send_tensor_dict`."""
    group = _require_group(group, "recv_tensor_dict")
    _check_member(src, group, "src")
    if src == group.global_rank:
        raise ValueError(f"src={src} is this rank; recv_tensor_dict needs another rank of {list(group.ranks)}")
    with _naming_failures(f"recv_tensor_dict from rank {src} on rank {group.global_rank}"):
        metadata = _receive_metadata(group, src, broadcast=False)
        tensors = _allocate(metadata.tensors, group, src)
        works = [dist.irecv(buffer, src=src, group=group_for) for buffer, group_for in _tensor_buffers(tensors, group)]
        _wait_all(works)
    return _rebuild(metadata.structure, iter(tensors))


@dataclass(frozen=True)
class _Metadata:
    structure: dict[str, Any]  # the dict with each tensor replaced by a slot
    tensors: list[TensorMeta]  # one per slot, in walk order


@contextmanager
def _naming_failures(what: str) -> Iterator[None]:
    """Turn torch.distributed's errors (which name sockets, not ranks) into one that names the transfer."""
    try:
        yield
    except CommunicationError:
        raise
    except RuntimeError as error:
        raise CommunicationError(f"{what} failed: {error}") from error


def _resolve_group(group: GroupCoordinator | None) -> GroupCoordinator | None:
    if group is not None:
        return group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return get_world_group()


def _require_group(group: GroupCoordinator | None, caller: str) -> GroupCoordinator:
    resolved = _resolve_group(group)
    if resolved is None:
        raise RuntimeError(f"{caller} needs a process group, but torch.distributed is not initialised")
    return resolved


def _check_member(rank: int, group: GroupCoordinator, name: str) -> None:
    if rank not in group.ranks:
        raise ValueError(f"{name}={rank} is not in the group's global ranks {list(group.ranks)}")


def _send_metadata(tensor_dict: Any, group: GroupCoordinator, *, dst: int | None, src: int) -> list[torch.Tensor]:
    """Split and send the metadata (broadcast when `dst` is None); returns the tensors still to send."""
    tensors: list[torch.Tensor] = []
    try:
        if tensor_dict is None:
            raise ValueError(f"rank {src} is the sender but its tensor_dict is None")
        structure = _split(tensor_dict, tensors)
        metas = [TensorMeta(t.dtype, tuple(t.shape), _device_type(t, group)) for t in tensors]
        message: _Metadata | _SenderFailed = _Metadata(structure, metas)
    except (TypeError, ValueError) as error:
        message, failure = _SenderFailed(f"{type(error).__name__}: {error}"), error
    else:
        failure = None
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if dst is None:
        dist.broadcast_object_list([payload], src=src, group=group.cpu_group)
    else:
        dist.send_object_list([payload], dst=dst, group=group.cpu_group)
    _counters.metadata_messages += 1
    _counters.metadata_bytes += len(payload)
    if failure is not None:
        raise failure
    return tensors


def _receive_metadata(group: GroupCoordinator, src: int, *, broadcast: bool) -> _Metadata:
    holder: list[Any] = [None]
    if broadcast:
        dist.broadcast_object_list(holder, src=src, group=group.cpu_group)
    else:
        dist.recv_object_list(holder, src=src, group=group.cpu_group)
    payload: bytes = holder[0]
    _counters.metadata_messages += 1
    _counters.metadata_bytes += len(payload)
    message = pickle.loads(payload)
    if isinstance(message, _SenderFailed):
        raise CommunicationError(f"rank {src} could not send its tensor dict: {message.message}")
    return message


def _device_type(tensor: torch.Tensor, group: GroupCoordinator) -> str:
    device_type = tensor.device.type
    if device_type != "cpu" and device_type != group.device.type:
        raise ValueError(
            f"a tensor on {tensor.device} cannot be sent over a group on {group.device}; "
            f"expected a cpu or {group.device.type} tensor"
        )
    return device_type


def _allocate(metas: list[TensorMeta], group: GroupCoordinator, src: int) -> list[torch.Tensor]:
    tensors = []
    for meta in metas:
        if meta.device_type == "cpu":
            device = torch.device("cpu")
        elif meta.device_type == group.device.type:
            device = group.device
        else:
            raise CommunicationError(
                f"rank {src} sent a {meta.device_type} tensor, but this rank's group is on {group.device}"
            )
        tensors.append(torch.empty(meta.shape, dtype=meta.dtype, device=device))
    return tensors


def _tensor_buffers(tensors: list[torch.Tensor], group: GroupCoordinator) -> list[tuple[torch.Tensor, dist.ProcessGroup]]:
    """Each non-empty tensor as contiguous bytes (sharing memory when it already is contiguous), with its group."""
    buffers = []
    for tensor in tensors:
        if tensor.numel() == 0:
            continue
        flat = tensor.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
        if flat.stride(0) != 1:
            # A one-element slice counts as contiguous whatever its stride, and view() would refuse it.
            flat = flat.as_strided((1,), (1,))
        data = flat.view(torch.uint8)
        buffers.append((data, group.cpu_group if tensor.device.type == "cpu" else group.device_group))
        _counters.tensor_messages += 1
        _counters.tensor_bytes += data.numel()
    return buffers


def _wait_all(works: list[dist.Work | None]) -> None:
    for work in works:
        if work is not None:
            work.wait()


_SCALAR_TYPES = frozenset({type(None), bool, int, float, str, bytes})


class _UnsupportedValue(TypeError):
    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value
        self.path: list[str] = []

    def __str__(self) -> str:
        where = "tensor_dict" + "".join(self.path)
        return (
            f"{where} is a {type(self.value).__module__}.{type(self.value).__qualname__}; a tensor dict holds "
            "tensors and plain values (None, bool, int, float, str, bytes, and lists, tuples and dicts of them)"
        )


def _split(tensor_dict: Any, tensors: list[torch.Tensor]) -> dict[str, Any]:
    """The dict with each tensor replaced by a placeholder; appends the tensors to `tensors` in walk order."""
    if type(tensor_dict) is not dict:
        raise TypeError(f"tensor_dict must be a dict, got a {type(tensor_dict).__qualname__}")
    for key in tensor_dict:
        if type(key) is not str:
            raise TypeError(f"tensor_dict keys must be str, got {key!r} ({type(key).__qualname__})")
    try:
        return _strip_tensors(tensor_dict, tensors)
    except _UnsupportedValue as error:
        raise TypeError(str(error)) from None  # the path is all the caller needs, not our recursion


def _strip_tensors(value: Any, tensors: list[torch.Tensor]) -> Any:
    kind = type(value)
    if kind in _SCALAR_TYPES:
        return value
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _TENSOR
    if kind is dict:
        stripped = {}
        for key, item in value.items():
            if type(key) not in _SCALAR_TYPES:
                error = _UnsupportedValue(key)
                error.path.append(f" key {key!r}")
                raise error
            try:
                stripped[key] = _strip_tensors(item, tensors)
            except _UnsupportedValue as error:
                error.path.insert(0, f"[{key!r}]")
                raise
        return stripped
    if kind is list or kind is tuple:
        items = []
        for index, item in enumerate(value):
            try:
                items.append(_strip_tensors(item, tensors))
            except _UnsupportedValue as error:
                error.path.insert(0, f"[{index}]")
                raise
        return items if kind is list else tuple(items)
    raise _UnsupportedValue(value)


class _TensorSlot:
    """Where a tensor was; the receiver fills slots in the order the sender found the tensors."""

    def __reduce__(self) -> str:
        return "_TENSOR"  # one shared instance, also after unpickling


_TENSOR = _TensorSlot()


def _rebuild(value: Any, tensors: Any) -> Any:
    if value is _TENSOR:
        return next(tensors)
    kind = type(value)
    if kind is dict:
        return {key: _rebuild(item, tensors) for key, item in value.items()}
    if kind is list:
        return [_rebuild(item, tensors) for item in value]
    if kind is tuple:
        return tuple(_rebuild(item, tensors) for item in value)
    return value
