"""The examples run as users run them."""

from __future__ import annotations

import os
import subprocess
import sys

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")


def run_example(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_quickstart():
    out = run_example("quickstart.py")
    assert "'The capital of France is' ->" in out and "Paris" in out
    assert "assistant:" in out


def test_custom_runner_applies_its_logits_processor():
    out = run_example("custom_runner.py")
    reply = out.split("reply without the letter e:", 1)[1].split("\n", 1)[0]
    assert reply.strip() and "e" not in reply.lower()
    assert "hidden-state norms of the first tokens: [" in out
