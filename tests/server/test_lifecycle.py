"""The server process itself: `--tp 2` (it spawns its second rank), a dead rank, and clean shutdown on signals."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

import httpx
import psutil
import pytest

from chat_core import Engine, SamplingParams
from server_process import start_server, stop_server

QUESTION = [{"role": "user", "content": "what is the capital"}]


def child_pids(pid: int) -> list[int]:
    """Every process under `pid` (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in os.listdir(f"/proc/{parent}/task"):
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except FileNotFoundError:
                continue
            found += children
            todo += children
    return found


def command_line(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def tp2_server(tiny_chat_model, tmp_path_factory):
    log_dir = str(tmp_path_factory.mktemp("serve-logs"))
    server = start_server("--model", tiny_chat_model, "--tp", "2", log_dir=log_dir, env={"OMP_NUM_THREADS": "1"})
    try:
        yield server
    finally:
        stop_server(server.process)


def test_tensor_parallel_server_answers_like_one_process(tp2_server, tiny_chat_model):
    params = SamplingParams(temperature=0, max_tokens=12)
    with Engine.from_pretrained(tiny_chat_model) as engine:
        expected = engine.chat(QUESTION, params).text
    client = tp2_server.client()
    answer = client.chat.completions.create(model=tp2_server.model, messages=QUESTION, temperature=0, max_tokens=12)
    assert answer.choices[0].message.content == expected
    stream = client.chat.completions.create(model=tp2_server.model, messages=QUESTION, temperature=0, max_tokens=12, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_a_dead_rank_makes_the_server_unhealthy_and_it_still_shuts_down_cleanly(tp2_server):
    children = child_pids(tp2_server.process.pid)
    workers = [pid for pid in children if "chat_distributed.worker_main" in command_line(pid)]
    assert len(workers) == 1, [command_line(pid) for pid in children]
    os.kill(workers[0], signal.SIGKILL)
    response = httpx.post(f"{tp2_server.url}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 4}, timeout=120)
    assert response.status_code in (500, 503)
    assert "rank 1" in response.json()["error"]["message"]
    health = httpx.get(f"{tp2_server.url}/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
    assert httpx.post(f"{tp2_server.url}/v1/chat/completions", json={"messages": QUESTION}).status_code == 503
    assert stop_server(tp2_server.process) == 0
    deadline = time.monotonic() + 10
    while any(is_running(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if is_running(pid)]  # nothing left behind


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_server_cleanly_even_mid_stream(tiny_chat_model, tmp_path, sig):
    # No grace period: the open stream is cut short at once (tests/server/test_drain.py lets it finish).
    server = start_server("--model", tiny_chat_model, "--shutdown-timeout", "0", log_dir=str(tmp_path))
    try:
        body = {"messages": QUESTION, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            server.process.send_signal(sig)
            events = [line for line in lines if line.startswith("data: ")]
        server.process.wait(timeout=30)
    finally:
        stop_server(server.process)
    assert server.process.returncode == 0
    assert "Traceback" not in server.log() and "ERROR" not in server.log(), server.log()
    # The open stream was told why it ended, instead of holding the shutdown until it finished.
    assert events[-1] == "data: [DONE]" and "server_shutting_down" in events[-2]


def test_serve_under_torchrun_answers_like_one_process(tiny_chat_model, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master_port = s.getsockname()[1]
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(master_port), "-m")
    server = start_server("--model", tiny_chat_model, log_dir=str(tmp_path), env={"OMP_NUM_THREADS": "1"}, launcher=launcher)
    try:
        with Engine.from_pretrained(tiny_chat_model) as engine:
            expected = engine.chat(QUESTION, SamplingParams(temperature=0, max_tokens=12)).text
        answer = server.client().chat.completions.create(model=server.model, messages=QUESTION, temperature=0, max_tokens=12)
        assert answer.choices[0].message.content == expected
        ranks = [p for p in psutil.Process(server.process.pid).children(recursive=True) if "chat_cli" in " ".join(p.cmdline())]
        assert len(ranks) == 2
    finally:
        stop_server(server.process)  # torchrun itself exits non-zero on SIGTERM; what matters is that its ranks end
    _, alive = psutil.wait_procs(ranks, timeout=15)
    assert not alive
