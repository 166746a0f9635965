"""Engine failures and overload over real HTTP: the app served by uvicorn in this process, on an engine whose
executor fails or stalls when a test says so (a real process cannot be made to fail on cue); and, last, on a
distributed engine whose rank process is stopped for real."""

from __future__ import annotations

import json
import os
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import httpx
import pytest

from chat_cli.server import ServerSettings, build_app
from chat_core import Engine
from chat_core.engine.async_engine import AsyncEngine
from server_process import serve_in_thread, start_server, stop_server

HELLO = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


class Faults:
    """Wraps an executor: fails the next `fail_steps` steps, holds steps while `gate` is clear, and can play dead."""

    def __init__(self, executor) -> None:
        self.inner_execute = executor.execute_model
        self.fail_steps = 0
        self.dead = False
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        executor.execute_model = self.execute_model
        executor.check_health = self.check_health

    def execute_model(self, request):
        self.entered.set()
        self.gate.wait(timeout=30)
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("injected step failure")
        return self.inner_execute(request)

    def check_health(self) -> None:
        if self.dead:
            raise RuntimeError("injected: a worker is gone")


@dataclass
class FaultyServer:
    url: str
    faults: Faults


@pytest.fixture
def make_server(tiny_chat_model):
    stack = []

    def make(max_waiting_requests: int = 256) -> FaultyServer:
        engine = Engine.from_pretrained(tiny_chat_model)
        faults = Faults(engine.executor)
        async_engine = AsyncEngine(engine, max_waiting_requests=max_waiting_requests)
        serving = serve_in_thread(build_app(async_engine, ServerSettings(served_model_name="tiny")))
        url = serving.__enter__()
        stack.append((serving, async_engine))
        return FaultyServer(url, faults)

    yield make
    for serving, async_engine in stack:
        serving.__exit__(None, None, None)
        async_engine.shutdown()


def chat(url: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={**HELLO, **extra}, timeout=60)


def test_a_failed_step_is_500_and_the_server_goes_on(make_server):
    server = make_server()
    server.faults.fail_steps = 1
    response = chat(server.url)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error"
    assert "injected step failure" in error["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert chat(server.url).status_code == 200


def test_a_step_that_fails_mid_stream_ends_the_stream_with_an_error_event(make_server):
    server = make_server()
    body = {**HELLO, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
                if len(events) == 2:
                    server.faults.fail_steps = 1
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_error" and "injected step failure" in error["message"]
    assert len(events) < 100  # it ended at the failure, not after 200 tokens
    assert chat(server.url).status_code == 200


def test_a_dead_engine_is_503_on_health_and_on_requests(make_server):
    server = make_server()
    server.faults.fail_steps, server.faults.dead = 1, True
    assert chat(server.url).status_code == 500  # the request in flight when it died
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
    response = chat(server.url)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "engine_dead" and "cannot recover" in response.json()["error"]["message"]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "chat_engine_healthy 0.0" in metrics


def test_overload_is_429_with_retry_after(make_server):
    server = make_server(max_waiting_requests=1)
    server.faults.gate.clear()  # the first request's step stalls; the others queue up behind it
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(chat, server.url)
        assert server.faults.entered.wait(timeout=30)
        others = [pool.submit(chat, server.url) for _ in range(2)]
        # While the step is stalled one of them waits in the queue and the other is refused at once.
        done, _ = wait(others, timeout=60, return_when=FIRST_COMPLETED)
        assert done, "neither queued request was answered while the step stalled"
        server.faults.gate.set()
        responses = [first.result(), *(f.result() for f in others)]
    assert sorted(r.status_code for r in responses) == [200, 200, 429]
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1"
    error = refused.json()["error"]
    assert (
        error["type"] == "rate_limit_error"
        and error["code"] == "engine_overloaded"
        and "the queue is full: 1 waiting request(s)" in error["message"]
    )
    assert chat(server.url).status_code == 200  # once the queue drains, requests are taken again


def test_the_queue_counts_requests_not_their_completions(make_server):
    """Two prompts of n=3 each (6 sequences) on a queue of 2 requests: taken, not 429 (which no retry would change)."""
    server = make_server(max_waiting_requests=2)
    body = {"model": "tiny", "prompt": ["hello", "world"], "max_tokens": 2, "n": 3}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 6


def test_more_prompts_than_the_queue_holds_is_400_naming_the_limit(tiny_chat_model, tmp_path):
    """`chat-cli serve --max-waiting-requests 2`: a request of 3 prompts could never be queued whole."""
    server = start_server("--model", tiny_chat_model, "--max-waiting-requests", "2", log_dir=str(tmp_path))
    try:
        body = {"model": tiny_chat_model, "prompt": ["a", "b", "c"], "max_tokens": 2}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 400, response.text
        assert "limit of 2 per request" in response.json()["error"]["message"]
        assert httpx.post(f"{server.url}/v1/completions", json={**body, "prompt": ["a", "b"]}, timeout=60).status_code == 200
    finally:
        assert stop_server(server.process) == 0


def test_a_stopped_rank_turns_the_server_unhealthy_instead_of_hanging(tiny_chat_model, left_behind):
    """A real rank process, stopped with SIGSTOP: the step in flight fails within the timeout, then the server is dead."""
    engine = Engine.from_pretrained(tiny_chat_model, tensor_parallel_size=2, distributed_timeout_s=3)
    async_engine = AsyncEngine(engine)
    try:
        with serve_in_thread(build_app(async_engine, ServerSettings(served_model_name="tiny"))) as url:
            assert chat(url).status_code == 200
            os.kill(engine.executor.processes.processes[1].pid, signal.SIGSTOP)
            response = chat(url)  # its step waits for the stopped rank for 3 s, then fails
            assert response.status_code == 500
            assert "rank 1" in response.json()["error"]["message"] and "no sign of life" in response.json()["error"]["message"]
            health = httpx.get(f"{url}/health")
            assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
            assert chat(url).status_code == 503
    finally:
        async_engine.shutdown()
    assert not left_behind()
