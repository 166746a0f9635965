"""A model runner that holds every step while a file exists, so a test can keep requests in flight for as long as
its checks take, whatever the machine's speed. The file is named by $CHAT_TEST_GATE; loaded with
`chat-cli serve --model-runner-cls gated_runner:GatedRunner` (this directory on PYTHONPATH).

While the file exists, a number in it lets that many steps through (counted from when the file appeared): a test
can advance the engine a step at a time (`let_steps_through`), e.g. until a request it sent has joined the batch."""

from __future__ import annotations

import os
import time
from pathlib import Path

from chat_core import LlamaModelRunner

GATE_ENV = "CHAT_TEST_GATE"


def let_steps_through(gate: Path, steps: int) -> None:
    """Let `steps` steps through the closed gate in all (since it was created); written whole, never half-read."""
    part = gate.with_name(gate.name + ".part")
    part.write_text(str(steps))
    os.replace(part, gate)


def _steps_allowed(gate: str) -> int | None:
    """None while the gate is open (no file); else how many steps may pass it."""
    try:
        text = Path(gate).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text else 0


class GatedRunner(LlamaModelRunner):
    _passed_the_gate = 0  # steps let through since the gate was last closed

    def process_logits(self, logits, model_input):  # type: ignore[no-untyped-def]
        gate = os.environ.get(GATE_ENV)
        while gate:
            allowed = _steps_allowed(gate)
            if allowed is None:
                self._passed_the_gate = 0
                break
            if self._passed_the_gate < allowed:
                self._passed_the_gate += 1
                break
            time.sleep(0.01)
        return super().process_logits(logits, model_input)
