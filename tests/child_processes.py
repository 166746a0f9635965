"""Which child processes a test left behind: those alive now that were not alive when it began.

Processes that outlive one test on purpose (a session-scoped server, multiprocessing's resource tracker, which is
Python's own and ends with this interpreter) are not counted against the tests that run while they are up."""

from __future__ import annotations

import psutil


def live_children() -> list[psutil.Process]:
    """This process's live descendants, without zombies and without multiprocessing's resource tracker."""
    alive = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.status() == psutil.STATUS_ZOMBIE or "resource_tracker" in " ".join(process.cmdline()):
                continue
        except psutil.NoSuchProcess:
            continue
        alive.append(process)
    return alive


class ChildWatch:
    """Started at the beginning of a test; `left_behind()` names the children started since that are still alive."""

    def __init__(self) -> None:
        self.before = {_identity(p) for p in live_children()}

    def left_behind(self) -> list[psutil.Process]:
        return [p for p in live_children() if _identity(p) not in self.before]


def _identity(process: psutil.Process) -> tuple[int, float]:
    """(pid, start time): a pid alone may be reused."""
    try:
        return process.pid, process.create_time()
    except psutil.NoSuchProcess:  # gone since it was listed
        return process.pid, 0.0
