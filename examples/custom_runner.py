"""A model runner of your own, plugged into the Engine without touching the library.

This runner subclasses the default `LlamaModelRunner` twice over:
- `process_logits` applies a logits processor: it bans a set of token ids (here: every token whose
  text contains the letter "e", a lipogram), so the model can never produce them;
- `process_hidden_states` records the norm of the final hidden state of every sampled token.

    python examples/custom_runner.py [MODEL]
"""

from __future__ import annotations

import sys

import torch

from chat_core import Engine, LlamaModelInput, LlamaModelRunner, SamplingParams


class LipogramRunner(LlamaModelRunner):
    banned_token_ids: list[int] = []  # set before the engine starts
    hidden_state_norms: list[float] = []

    def process_hidden_states(self, hidden_states: torch.Tensor, model_input: LlamaModelInput) -> torch.Tensor:
        LipogramRunner.hidden_state_norms.extend(hidden_states.norm(dim=-1).tolist())
        return hidden_states

    def process_logits(self, logits: torch.Tensor, model_input: LlamaModelInput) -> torch.Tensor:
        banned = torch.tensor(self.banned_token_ids, device=logits.device, dtype=torch.long)
        return logits.index_fill(1, banned, float("-inf"))


def main(model: str = "smollm2-135m-instruct") -> str:
    from chat_core import open_checkpoint

    tokenizer = open_checkpoint(model).load_tokenizer()
    LipogramRunner.banned_token_ids = [
        i for i in range(tokenizer.vocab_size) if "e" in tokenizer.decode([i]).lower() and i not in tokenizer.stop_token_ids
    ]
    with Engine.from_pretrained(model, model_runner_cls=LipogramRunner) as engine:
        reply = engine.chat([{"role": "user", "content": "Describe the sea in one sentence."}], SamplingParams(temperature=0, max_tokens=40))
    print("reply without the letter e:", reply.text)
    print("hidden-state norms of the first tokens:", [round(n, 1) for n in LipogramRunner.hidden_state_norms[:5]])
    return reply.text


if __name__ == "__main__":
    main(*sys.argv[1:])
