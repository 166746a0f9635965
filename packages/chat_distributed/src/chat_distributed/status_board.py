"""Where each spawned rank stands, in a small memory-mapped file the launcher reads: no pipe, no lock.

Each spawned rank writes only its own slot: its phase (starting, joining, loading, ...), the steps it
has finished and a heartbeat (`time.monotonic()`, one clock for every process on the machine); slot 0
is unused, rank 0 being the engine's own process. From these the launcher names the rank a failed step
waited for: one with an old heartbeat is stopped or frozen; one behind rank 0's step is stuck.
Plain 8-byte fields, each with one writer: a reader sees either the old or the new value.
"""

from __future__ import annotations

import mmap
import struct
import time

PHASES = (
    "starting",
    "joining the process group",
    "loading the model",
    "allocating the KV cache",
    "serving steps",
    "stopped",
)
STARTING, JOINING, LOADING, ALLOCATING, SERVING, STOPPED = range(len(PHASES))
HEARTBEAT_INTERVAL_S = 0.5
STALE_HEARTBEAT_S = 2.0  # four missed beats: stopped or frozen, not merely busy

_PHASE, _STEPS, _HEARTBEAT = struct.Struct("q"), struct.Struct("q"), struct.Struct("d")
_SLOT_SIZE = 24  # phase at 0, steps finished at 8, heartbeat at 16


class RankStatusBoard:
    """One slot per rank in the file at `path`; `create` it in the launcher, `attach` to it in a rank.

    Each field has one writer (a rank's heartbeat thread writes only the heartbeat), so no update is lost."""

    def __init__(self, path: str, world_size: int, file: mmap.mmap) -> None:
        self.path = path
        self.world_size = world_size
        self._map = file

    @classmethod
    def create(cls, path: str, world_size: int) -> RankStatusBoard:
        with open(path, "wb") as f:
            f.write(bytes(_SLOT_SIZE * world_size))
        return cls.attach(path, world_size)

    @classmethod
    def attach(cls, path: str, world_size: int) -> RankStatusBoard:
        with open(path, "r+b") as f:
            file = mmap.mmap(f.fileno(), _SLOT_SIZE * world_size)
        return cls(path, world_size, file)

    # Written by the rank itself
    def set_phase(self, rank: int, phase: int) -> None:
        _PHASE.pack_into(self._map, rank * _SLOT_SIZE, phase)

    def count_step(self, rank: int) -> None:
        _STEPS.pack_into(self._map, rank * _SLOT_SIZE + 8, self.steps(rank) + 1)

    def beat(self, rank: int) -> None:
        _HEARTBEAT.pack_into(self._map, rank * _SLOT_SIZE + 16, time.monotonic())

    # Read by the launcher
    def phase(self, rank: int) -> int:
        return _PHASE.unpack_from(self._map, rank * _SLOT_SIZE)[0]

    def steps(self, rank: int) -> int:
        return _STEPS.unpack_from(self._map, rank * _SLOT_SIZE + 8)[0]

    def seconds_since_heartbeat(self, rank: int) -> float:
        """How long ago `rank` last showed a sign of life; infinite if it never has."""
        heartbeat = _HEARTBEAT.unpack_from(self._map, rank * _SLOT_SIZE + 16)[0]
        return time.monotonic() - heartbeat if heartbeat else float("inf")

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()
