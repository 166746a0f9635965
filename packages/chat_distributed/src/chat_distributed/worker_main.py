"""The interpreter of one spawned rank: `python -m chat_distributed.worker_main --rank N`.

It reads its `WorkerLaunch` from stdin (never argv: nothing of the config shows in `ps`), then serves
steps until rank 0 says stop. It never imports the user's main module: what it needs from there (a
model runner class defined in a script or a notebook cell) came by value inside the config, pickled
with cloudpickle. A watchdog thread beats on the status board and ends the process, removing the
launch directory, if the process that started it disappears.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import signal
import sys
import threading
import time

from chat_distributed.processes import WorkerLaunch
from chat_distributed.status_board import HEARTBEAT_INTERVAL_S, RankStatusBoard
from chat_distributed.worker import serve_rank


def main(argv: list[str] | None = None) -> None:
    # Ctrl-C in a terminal reaches the whole process group: the engine's process handles it and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="python -m chat_distributed.worker_main", description=__doc__)
    parser.add_argument("--rank", type=int, required=True)
    rank = parser.parse_args(argv).rank
    launch: WorkerLaunch = pickle.loads(sys.stdin.buffer.read())
    sys.stdin.close()

    board = RankStatusBoard.attach(launch.status_path, launch.world_size)
    threading.Thread(target=_watch, args=(board, rank, launch), name="chat-rank-watchdog", daemon=True).start()
    config = pickle.loads(launch.config)  # cloudpickle's output loads with pickle (cloudpickle must be installed)

    def set_phase(phase: int) -> None:
        board.set_phase(rank, phase)

    def count_step() -> None:
        board.count_step(rank)

    try:
        serve_rank(config, rank=rank, init_method=launch.init_method, on_phase=set_phase, on_step=count_step)
    except BaseException:
        if _parent_gone(launch, within_s=1.0):
            _leave_orphaned(launch)  # the engine is gone, and the broken connection it left is no news
        raise


def _watch(board: RankStatusBoard, rank: int, launch: WorkerLaunch) -> None:
    """Beat every HEARTBEAT_INTERVAL_S; a rank must never outlive its launcher, even one killed with SIGKILL."""
    while True:
        if os.getppid() != launch.parent_pid:
            _leave_orphaned(launch)
        board.beat(rank)
        time.sleep(HEARTBEAT_INTERVAL_S)



def _parent_gone(launch: WorkerLaunch, within_s: float) -> bool:
    """Whether the launcher is gone, or goes within `within_s`: a dying process closes its sockets
    (which may be what broke this rank's step) a moment before its children are handed on."""
    deadline = time.monotonic() + within_s
    while os.getppid() == launch.parent_pid:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _leave_orphaned(launch: WorkerLaunch) -> None:
    shutil.rmtree(launch.directory, ignore_errors=True)  # nobody else is left to remove it
    os._exit(1)


if __name__ == "__main__":
    main()
