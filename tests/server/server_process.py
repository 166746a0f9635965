"""A real `python -m chat_cli serve` process: started, waited for, talked to, stopped; or an app served in this process."""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import openai
import uvicorn

SMOLLM2_NAME = "smollm2"
SMOLLM2_MAX_MODEL_LEN = 2048
SMOLLM2_MAX_TOKENS_LIMIT = 512
SMOLLM2_MAX_BODY_BYTES = 64 * 1024
TINY_API_KEY = "test-key-123"

_READY = re.compile(r"^serving (?P<model>.+) on (?P<url>http://\S+)$")


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    url: str
    model: str
    api_key: str | None
    log_path: str

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0, timeout=120, **kwargs)

    def async_client(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0, timeout=120, **kwargs
        )

    def metrics(self) -> dict[str, float]:
        """The /metrics samples by name (labels included), e.g. 'chat_engine_steps_total'."""
        return read_metrics(self.url)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()


def start_server(
    *args: str,
    log_dir: str,
    env: dict[str, str] | None = None,
    api_key: str | None = None,
    timeout: float = 180,
    launcher: tuple[str, ...] = (sys.executable, "-m"),
) -> ServerProcess:
    """Start `chat-cli serve --port 0 ARGS` (its stderr in a file under `log_dir`) and wait for its 'serving ... on URL' line.

    `launcher` runs the `chat_cli` module: plain Python by default, or e.g. torchrun's `... -m`."""
    log = tempfile.NamedTemporaryFile("w", dir=log_dir, prefix="chat-serve-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [*launcher, "chat_cli", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = process.stdout.readline()
            if not line:  # stdout closed: the process exited
                break
            ready = _READY.match(line.strip())
            if ready:
                return ServerProcess(process, ready["url"], ready["model"], api_key, log.name)
    finally:
        selector.close()
    stop_server(process)
    with open(log.name) as f:
        raise RuntimeError(f"chat-cli serve {' '.join(args)} did not start (exit code {process.returncode}):\n{f.read()[-4000:]}")


def stop_server(process: subprocess.Popen[str], timeout: float = 30) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """An ASGI app served by uvicorn on a thread of this process, at the URL it yields (real HTTP, in-process state)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


def read_metrics(url: str, timeout: float = 30) -> dict[str, float]:
    """The /metrics samples of the server at `url` by name (labels included)."""
    samples = {}
    for line in httpx.get(f"{url}/metrics", timeout=timeout).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
