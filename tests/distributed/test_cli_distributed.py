"""chat-cli with --tp/--pp (ranks spawned by the CLI) and under torchrun (one node and two)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from chat_core import Engine, SamplingParams

GENERATE = ["generate", "--temperature", "0", "--max-tokens", "10", "hello world"]


def run(args: list[str], *, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout, env=env)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def expected(tiny_chat_model):
    params = SamplingParams(temperature=0, max_tokens=10)
    with Engine.from_pretrained(tiny_chat_model) as engine:
        generated = engine.generate("hello world", params)[0].text
        history, answers = [], []
        for turn in ("hello there", "what is the capital"):
            history.append({"role": "user", "content": turn})
            answers.append(engine.chat(history, SamplingParams(temperature=0, max_tokens=6)).text)
            history.append({"role": "assistant", "content": answers[-1]})
    return generated, answers


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"]])
def test_generate_spawning_its_ranks(tiny_chat_model, expected, layout):
    result = run([sys.executable, "-m", "chat_cli", *GENERATE, "--model", tiny_chat_model, *layout])
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected[0] + "\n"


def test_generate_under_torchrun(tiny_chat_model, expected):
    result = run(torchrun("--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "chat_cli", *GENERATE, "--model", tiny_chat_model))
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected[0] + "\n"  # only rank 0 prints


def test_chat_under_tensor_parallel_answers_like_one_process(tiny_chat_model, expected):
    args = ["chat", "--model", tiny_chat_model, "--temperature", "0", "--max-tokens", "6"]
    for command in ([sys.executable, "-m", "chat_cli", *args, "--tp", "2"], torchrun("--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "chat_cli", *args)):
        result = run(command, stdin="hello there\nwhat is the capital\n")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split("\n")[:2] == expected[1]


def test_two_nodes_with_torchrun_rendezvous(tiny_chat_model, expected):
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "chat-test"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            torchrun(*common, "-m", "chat_cli", *GENERATE, "--model", tiny_chat_model),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=180) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert all(node.returncode == 0 for node in nodes), [err for _, err in outputs]
    # Exactly one of the two nodes hosts rank 0 and prints the answer.
    printed = sorted(out for out, _ in outputs)
    assert printed == ["", expected[0] + "\n"]
