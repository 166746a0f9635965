"""A model runner that fails on cue in one rank, for fault tests with real processes.

    Engine.from_pretrained(path, tensor_parallel_size=2, model_runner_cls=FaultyRunner,
                           extra={"fault": {"rank": 1, "at": "load" | "step", "step": 1, "action": "kill" | "hang"}})

It reaches the spawned ranks by reference: this module imports there because the launcher hands its
ranks the parent's `sys.path`. Step 1 is the prompt's prefill.
"""

from __future__ import annotations

import os
import signal
import threading
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from chat_core import LlamaModelRunner


class FaultyRunner(LlamaModelRunner):
    def load_model(self, checkpoint: Any) -> None:
        self.steps_run = 0
        if self._fault_here("load"):
            self._fail()
        super().load_model(checkpoint)

    def execute_model(self, model_input: Any, kv_cache: Any, intermediate: Any = None) -> Any:
        self.steps_run += 1
        if self._fault_here("step") and self.steps_run == self._fault.get("step", 1):
            self._fail()
        return super().execute_model(model_input, kv_cache, intermediate)

    @property
    def _fault(self) -> dict[str, Any]:
        return self.engine_config.extra.get("fault", {})

    def _fault_here(self, at: str) -> bool:
        global_rank = self.stage.rank * self.tp.size + self.tp.rank
        return self._fault.get("at") == at and self._fault.get("rank") == global_rank

    def _fail(self) -> None:
        action = self._fault["action"]
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "hang":
            # Stuck in a collective for good: a receive that no rank will ever send, with no time limit of its own.
            try:
                dist.irecv(torch.zeros(1), src=0, tag=4242).wait(timedelta(hours=1))
            finally:
                threading.Event().wait()
        else:
            raise ValueError(f"fault action {action!r} is unknown; expected 'kill' or 'hang'")
