"""After any failure path, leaving the interpreter leaves no process, no temporary file and no warning
(issue 11: "No warnings or leftovers at exit"); a launcher killed outright takes its ranks with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from script_runs import assert_clean_exit, files_left, processes_left, run_python

# A failed start, a rank killed mid-stream then shutdown(), a rank stopped mid-stream and no shutdown at all.
FAILURES = """\
import os, signal
from chat_core import Engine, SamplingParams
from chat_distributed import WorkerFailedError

def start(tp, **options):
    return Engine.from_pretrained({model!r}, tensor_parallel_size=tp, block_size=4, distributed_timeout_s=3, **options)

def fail_mid_stream(engine, sig):
    stream = engine.stream({{"prompt_token_ids": [5, 17, 33]}}, SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
    next(stream)
    os.kill(engine.executor.processes.processes[1].pid, sig)
    try:
        for _ in stream:
            pass
    except WorkerFailedError as error:
        print("failed:", error, flush=True)

try:  # int4 groups of 32 across an MLP of 160 over 2 ranks: every rank fails while building its model
    start(2, quantization="int4", quantization_group_size=32)
except Exception as error:
    print("failed start:", error, flush=True)
engine = start(2)
fail_mid_stream(engine, signal.SIGKILL)
engine.shutdown()
engine = start(2)
fail_mid_stream(engine, signal.SIGSTOP)
"""


def test_leaving_after_every_failure_path_leaves_nothing_behind(tmp_path, tiny_checkpoints):
    (tmp_path / "failures.py").write_text(FAILURES.format(model=tiny_checkpoints("mistral")[0]))
    result = run_python(["failures.py"], tmp_path)
    printed = result.stdout.splitlines()
    assert printed[0].startswith("failed start:") and "cut groups in two" in printed[0], result.stdout
    assert "rank 1" in printed[1] and "SIGKILL" in printed[1], result.stdout
    assert "rank 1" in printed[2] and "no sign of life" in printed[2], result.stdout
    # The failed start's ranks print why they failed; that is their traceback, not a warning.
    result.stderr = "\n".join(line for line in result.stderr.splitlines() if "cut groups in two" not in line)
    assert_clean_exit(result, tmp_path)


IDLE = """\
from chat_core import Engine
engine = Engine.from_pretrained({model!r}, tensor_parallel_size=2)
print("ready", flush=True)
input()
"""


def test_ranks_leave_on_their_own_when_their_launcher_is_killed(tmp_path, tiny_checkpoints):
    (tmp_path / "idle.py").write_text(IDLE.format(model=tiny_checkpoints("mistral")[0]))
    (tmp_path / "tmp").mkdir()
    launcher = subprocess.Popen(
        [sys.executable, "idle.py"],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
    )
    try:
        assert launcher.stdout.readline() == "ready\n"
        assert len(processes_left(tmp_path)) == 2  # the launcher and rank 1
        launcher.send_signal(signal.SIGKILL)  # no atexit, no finalizer: only the rank's watchdog
        launcher.wait()
        deadline = time.monotonic() + 30
        while (processes_left(tmp_path) or files_left(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not processes_left(tmp_path)
        assert not files_left(tmp_path)  # the last rank out removed the launch directory
    finally:
        launcher.kill()
