"""Run a user's script in a fresh interpreter, as a user would, and find whatever it left behind.

Each run gets its own TMPDIR: the launch directory lands there, and every process the script started
(ranks included) inherits it, so a survivor is found by its environment even after it was orphaned.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

WARNING_SIGNS = ("leaked", "resource_tracker", "Warning", "warn(")


def run_python(args: list[str], cwd: Path, *, stdin: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`python ARGS` in `cwd`, with `cwd/tmp` as its TMPDIR."""
    tmp = cwd / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout, env=env)


def processes_left(cwd: Path) -> list[psutil.Process]:
    """Live processes started by a run in `cwd` (they carry its TMPDIR)."""
    tmp = str(cwd / "tmp")
    left = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("TMPDIR") == tmp and process.status() != psutil.STATUS_ZOMBIE:
                left.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return left


def files_left(cwd: Path) -> list[str]:
    return sorted(os.listdir(cwd / "tmp"))


def assert_clean_exit(result: subprocess.CompletedProcess[str], cwd: Path) -> None:
    """Exit code 0, no warning on stderr, and nothing left: no process, no temporary file."""
    assert result.returncode == 0, result.stderr[-4000:]
    assert not [sign for sign in WARNING_SIGNS if sign in result.stderr], result.stderr[-4000:]
    assert not processes_left(cwd), [p.cmdline() for p in processes_left(cwd)]
    assert not files_left(cwd)
