"""Ranks that die, stop or get stuck, with real processes: each is reported as WorkerFailedError naming the rank,
within `distributed_timeout_s` (a short one here), and shutdown leaves no process behind."""

from __future__ import annotations

import os
import signal
import time

import pytest
from faulty_runners import FaultyRunner

from chat_core import Engine, SamplingParams
from chat_distributed import WorkerFailedError

TIMEOUT_S = 3.0
NEVER_WAITS_FOREVER_S = TIMEOUT_S + 30  # a loose bound: the point is that nothing hangs
PROMPT = {"prompt_token_ids": [5, 17, 33, 9, 100]}
LONG = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)


@pytest.fixture(scope="module")
def mistral_dir(tiny_checkpoints):
    return tiny_checkpoints("mistral")[0]  # 8 heads, 2 kv heads, 4 layers




def start(mistral_dir: str, tp: int = 2, pp: int = 1, **options) -> Engine:
    return Engine.from_pretrained(
        mistral_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp, block_size=4, distributed_timeout_s=TIMEOUT_S, **options
    )


def fault(at: str, action: str, step: int = 1) -> dict:
    return {"model_runner_cls": FaultyRunner, "extra": {"fault": {"rank": 1, "at": at, "action": action, "step": step}}}


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_a_stopped_rank_is_named_within_the_timeout(mistral_dir, tp, pp, left_behind):
    engine = start(mistral_dir, tp, pp)
    try:
        rank1 = engine.executor.processes.processes[1]
        stream = engine.stream(PROMPT, LONG)
        next(stream)
        os.kill(rank1.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        with pytest.raises(WorkerFailedError, match=r"rank 1 \(pid \d+\) has shown no sign of life .* stopped"):
            for _ in stream:
                pass
        assert time.monotonic() - stopped_at < NEVER_WAITS_FOREVER_S
        with pytest.raises(WorkerFailedError, match="rank 1"):  # the engine stays failed
            engine.generate(PROMPT, SamplingParams(max_tokens=2))
    finally:
        engine.shutdown()  # SIGTERM would wait for a SIGCONT; the stopped rank must still go
    assert not left_behind()


def test_a_rank_stuck_in_a_collective_is_named_within_the_timeout(mistral_dir, left_behind):
    engine = start(mistral_dir, **fault("step", "hang", step=3))
    try:
        began = time.monotonic()
        with pytest.raises(WorkerFailedError, match=r"rank 1 \(pid \d+\) is alive but has not finished step 3"):
            engine.generate(PROMPT, LONG)
        assert time.monotonic() - began < NEVER_WAITS_FOREVER_S
    finally:
        engine.shutdown()
    assert not left_behind()


def test_a_rank_killed_while_loading_the_model_is_named(mistral_dir, left_behind):
    with pytest.raises(WorkerFailedError, match=r"rank 1 \(pid \d+\) died with exit code -9 \(SIGKILL\) while loading the model"):
        start(mistral_dir, **fault("load", "kill"))
    assert not left_behind()


def test_a_rank_killed_during_a_prefill_is_named(mistral_dir, left_behind):
    engine = start(mistral_dir, **fault("step", "kill", step=1))
    try:
        with pytest.raises(WorkerFailedError, match=r"rank 1 \(pid \d+\) died with exit code -9 \(SIGKILL\) while serving steps"):
            engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4))
    finally:
        engine.shutdown()
    assert not left_behind()


def test_a_rank_stopped_while_the_engine_is_idle_fails_the_health_check_within_the_timeout(mistral_dir, left_behind):
    engine = start(mistral_dir)
    try:
        engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2))
        engine.executor.check_health()  # healthy, and idle for longer than the timeout below: still healthy
        time.sleep(TIMEOUT_S + 0.5)
        engine.executor.check_health()
        assert len(engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2))[0].token_ids) == 2
        os.kill(engine.executor.processes.processes[1].pid, signal.SIGSTOP)
        deadline = time.monotonic() + NEVER_WAITS_FOREVER_S
        while True:
            try:
                engine.executor.check_health()
            except WorkerFailedError as error:
                assert "rank 1" in str(error) and "no sign of life" in str(error)
                break
            assert time.monotonic() < deadline, "a stopped rank was never reported"
            time.sleep(0.2)
    finally:
        engine.shutdown()
    assert not left_behind()
