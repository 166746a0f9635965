"""What the decode-path tests share: prompts whose sequences join and leave a batch, and a runner that keeps
every sampled row's logits."""

from __future__ import annotations

import torch

from chat_core import LlamaModelRunner

PROMPTS = [[5, 17, 33, 9, 100, 200, 250, 31, 64], [3, 4], list(range(40, 90)), [7] * 21, [11, 12, 13]]


class Recorder(LlamaModelRunner):
    """Keeps every sampled row's logits, keyed by sequence."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logits: dict[int, list[torch.Tensor]] = {}

    def process_logits(self, logits, model_input):
        for row, seq_id in enumerate(model_input.sampled_seq_ids):
            self.logits.setdefault(seq_id, []).append(logits[row].clone())
        return logits
