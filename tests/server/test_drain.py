"""Graceful drain of a real `chat-cli serve`: on SIGTERM or Ctrl-C new requests get 503 while the answers in flight
finish (up to --shutdown-timeout); then the rest is cut short, every rank stops and the command exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time

import httpx
import psutil
import pytest

from chat_core import Engine, SamplingParams
from gated_runner import GATE_ENV, let_steps_through
from server_process import ServerProcess, start_server, stop_server

HERE = os.path.dirname(os.path.abspath(__file__))

QUESTION = [{"role": "user", "content": "what is the capital"}]
OTHER_QUESTION = [{"role": "user", "content": "hello world"}]


def stream_body(max_tokens: int) -> dict:
    return {"messages": QUESTION, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}


def alone(model: str, *requests: tuple[list, int]) -> list[str]:
    """Each (messages, max_tokens) answered greedily on its own."""
    with Engine.from_pretrained(model) as engine:
        return [engine.chat(m, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)).text for m, n in requests]


def wait_for(condition, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def events_of(lines) -> list:
    """The JSON payloads of the remaining `data:` lines, and "[DONE]"."""
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]


def streamed_text(events: list) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in events if isinstance(c, dict) and c.get("choices"))


def gated(gate) -> tuple[list[str], dict[str, str]]:
    """Options and environment of a server whose steps wait while the file `gate` exists (see gated_runner)."""
    env = {"OMP_NUM_THREADS": "1", GATE_ENV: str(gate), "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    return ["--model-runner-cls", "gated_runner:GatedRunner"], env


def join_the_batch(server: ServerProcess, gate, sequences: int, timeout: float = 60) -> None:
    """Behind the closed gate, let steps through one at a time until `sequences` run (requests join between steps)."""
    deadline = time.monotonic() + timeout
    steps = 0
    while server.metrics()["chat_sequences_running"] < sequences:
        assert time.monotonic() < deadline, f"timed out waiting for {sequences} sequences to run"
        steps += 1
        let_steps_through(gate, steps)
        time.sleep(0.2)


def ranks_of(server: ServerProcess) -> list[psutil.Process]:
    return psutil.Process(server.process.pid).children(recursive=True)


def assert_refused_while_draining(server: ServerProcess) -> None:
    health = httpx.get(f"{server.url}/health", timeout=30)
    assert health.status_code == 503 and health.json()["error"]["code"] == "server_shutting_down"
    refused = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": OTHER_QUESTION, "max_tokens": 2}, timeout=30)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json() == {
        "error": {
            "message": "the server is shutting down; retry on another one",
            "type": "server_error",
            "param": None,
            "code": "server_shutting_down",
        }
    }


@pytest.mark.parametrize("sig, tp", [(signal.SIGTERM, 1), (signal.SIGINT, 2)], ids=["SIGTERM", "Ctrl-C-tp2"])
def test_a_signal_refuses_new_requests_and_lets_those_in_flight_finish(tiny_chat_model, tmp_path, sig, tp):
    streamed_tokens, whole_tokens = 100, 60  # many steps longer than the refusals checked meanwhile
    expected_stream, expected_whole = alone(tiny_chat_model, (QUESTION, streamed_tokens), (OTHER_QUESTION, whole_tokens))
    gate = tmp_path / "hold"
    options, env = gated(gate)
    server = start_server(
        "--model", tiny_chat_model, "--tp", str(tp), "--shutdown-timeout", "300", *options,
        log_dir=str(tmp_path), env=env,
    )  # fmt: skip
    try:
        ranks = ranks_of(server)
        whole: dict = {}
        body = {"messages": OTHER_QUESTION, "max_tokens": whole_tokens, "ignore_eos": True, "temperature": 0}
        thread = threading.Thread(
            target=lambda: whole.update(response=httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300))
        )
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=stream_body(streamed_tokens), timeout=300) as stream:
            lines = stream.iter_lines()
            first = events_of([next(line for line in lines if line.startswith("data: "))])
            gate.touch()  # the stream holds (it could end before the other request arrives on a fast machine)
            thread.start()
            join_the_batch(server, gate, 2)  # both stay in flight until the refusals are checked
            server.process.send_signal(sig)
            wait_for(lambda: httpx.get(f"{server.url}/health", timeout=30).status_code == 503, "the drain to begin")
            assert_refused_while_draining(server)
            gate.unlink()
            rest = events_of(lines)
        thread.join(timeout=300)
        assert server.process.wait(timeout=120) == 0
    finally:
        stop_server(server.process)
    # Both answers in flight were finished in full, as each would be alone.
    assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
    assert streamed_text(first + rest) == expected_stream
    response = whole["response"]
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == expected_whole
    log = server.log()
    assert "2 of 2 request(s) in flight ended" in log and "cut short" not in log, log
    assert "Traceback" not in log and "ERROR" not in log and "warning" not in log, log
    _, alive = psutil.wait_procs(ranks, timeout=15)
    assert not alive


def test_under_torchrun_sigterm_drains_too(tiny_chat_model, tmp_path):
    """torchrun passes SIGTERM on to every rank: the other ranks wait for rank 0 to stop them after its drain."""
    max_tokens = 100
    [expected] = alone(tiny_chat_model, (QUESTION, max_tokens))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master_port = s.getsockname()[1]
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(master_port), "-m")
    gate = tmp_path / "hold"
    options, env = gated(gate)
    server = start_server(
        "--model", tiny_chat_model, "--shutdown-timeout", "300", *options,
        log_dir=str(tmp_path), env=env, launcher=launcher,
    )  # fmt: skip
    try:
        ranks = [p for p in ranks_of(server) if "chat_cli" in " ".join(p.cmdline())]
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=stream_body(max_tokens), timeout=300) as stream:
            lines = stream.iter_lines()
            first = events_of([next(line for line in lines if line.startswith("data: "))])
            gate.touch()  # the answer stays in flight until the drain is seen to begin
            server.process.send_signal(signal.SIGTERM)  # to torchrun, which sends it to both ranks
            wait_for(lambda: httpx.get(f"{server.url}/health", timeout=30).status_code == 503, "the drain to begin")
            gate.unlink()
            rest = events_of(lines)
        server.process.wait(timeout=120)  # torchrun itself exits non-zero on SIGTERM; what matters is its ranks
    finally:
        stop_server(server.process)
    assert rest[-1] == "[DONE]" and streamed_text(first + rest) == expected
    assert "1 of 1 request(s) in flight ended" in server.log() and "cut short" not in server.log()
    _, alive = psutil.wait_procs(ranks, timeout=15)
    assert len(ranks) == 2 and not alive


@pytest.mark.parametrize("timeout, signals", [("0.5", 1), ("300", 2)], ids=["grace-period-over", "second-signal"])
def test_what_is_still_running_when_the_drain_ends_is_cut_short(tiny_chat_model, tmp_path, timeout, signals):
    max_tokens = 480
    gate = tmp_path / "hold"
    options, env = gated(gate)
    server = start_server("--model", tiny_chat_model, "--shutdown-timeout", timeout, *options, log_dir=str(tmp_path), env=env)
    try:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=stream_body(max_tokens), timeout=300) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            gate.touch()  # the answer stays in flight until the drain has ended, however fast the machine decodes
            server.process.send_signal(signal.SIGTERM)
            if signals == 2:
                wait_for(lambda: httpx.get(f"{server.url}/health", timeout=30).status_code == 503, "the drain to begin")
                server.process.send_signal(signal.SIGINT)
            wait_for(lambda: "cut short" in server.log(), "the drain to end")
            gate.unlink()
            events = events_of(lines)
        assert server.process.wait(timeout=120) == 0
    finally:
        stop_server(server.process)
    # The stream was told why it ended, before its 480 tokens.
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutting_down"
    assert len(events) < max_tokens
    why = "a second signal" if signals == 2 else "the 0.5 s grace period"
    assert f"0 of 1 request(s) in flight ended; 1 cut short by {why}" in server.log()
