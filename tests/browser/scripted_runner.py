"""A model runner whose answer the browser tests choose: SmolLM2 as it is, except for prompts with a trigger word.

A conversation whose new prompt contains TRIGGER is answered with SCRIPTED_REPLY, token by token,
then the end-of-sequence token: its logits are masked to that one token at each step, so the real
model still runs every step and the server streams it like any answer. Loaded by
`chat-cli serve --model-runner-cls scripted_runner:ScriptedReplyRunner` (this directory on PYTHONPATH).
"""

from __future__ import annotations

import torch

from chat_core import ExecuteModelRequest, LlamaModelInput, LlamaModelRunner

TRIGGER = "xyzzy"
# HTML the page must show as text, in and out of Markdown code, and a link it must not make.
SCRIPTED_REPLY = (
    "**Bold** `<b>`\n"
    "```html\n"
    "<script>alert(1)</script>\n"
    "```\n"
    "<script>alert(2)</script><img src=x onerror=alert(3)>\n"
    "- [trap](javascript:alert(4))\n"
    "- [link](https://example.com/)"
)


class ScriptedReplyRunner(LlamaModelRunner):
    def load_model(self, checkpoint) -> None:  # type: ignore[no-untyped-def]
        super().load_model(checkpoint)
        self.tokenizer = checkpoint.load_tokenizer()
        self.script = self.tokenizer.encode(SCRIPTED_REPLY, add_special_tokens=False)
        self.end_token = self.model_config.eos_token_ids[0]
        self.scripted_seq_ids: set[int] = set()
        self.step_positions: dict[int, int] = {}  # seq id -> tokens it has generated, for this step

    def prepare_model_input(self, request: ExecuteModelRequest) -> LlamaModelInput:
        self.scripted_seq_ids.difference_update(request.finished_seq_ids)
        for seq in request.scheduled:
            # A prompt chunk (nothing generated yet) that names the trigger.
            if seq.output_index == 0 and TRIGGER in self.tokenizer.decode(seq.token_ids):
                self.scripted_seq_ids.add(seq.seq_id)
        self.step_positions = {seq.seq_id: seq.output_index for seq in request.scheduled if seq.do_sample}
        return super().prepare_model_input(request)

    def process_logits(self, logits: torch.Tensor, model_input: LlamaModelInput) -> torch.Tensor:
        for row, seq_id in enumerate(model_input.sampled_seq_ids):
            if seq_id in self.scripted_seq_ids:
                position = self.step_positions[seq_id]
                token = self.script[position] if position < len(self.script) else self.end_token
                logits[row] = float("-inf")
                logits[row, token] = 0.0
        return logits
