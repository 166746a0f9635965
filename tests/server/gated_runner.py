"""A model runner that holds every step while a file exists, so a test can keep requests in flight for as long as
its checks take, whatever the machine's speed. The file is named by $CHAT_TEST_GATE; loaded with
`chat-cli serve --model-runner-cls gated_runner:GatedRunner` (this directory on PYTHONPATH)."""

from __future__ import annotations

import os
import time

from chat_core import LlamaModelRunner

GATE_ENV = "CHAT_TEST_GATE"


class GatedRunner(LlamaModelRunner):
    def process_logits(self, logits, model_input):  # type: ignore[no-untyped-def]
        gate = os.environ.get(GATE_ENV)
        while gate and os.path.exists(gate):
            time.sleep(0.01)
        return super().process_logits(logits, model_input)
