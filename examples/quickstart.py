"""Load the default model, generate a batch, stream a completion, and chat.

    python examples/quickstart.py [MODEL]
"""

import sys

from chat_core import Engine, SamplingParams

model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct"
greedy = SamplingParams(temperature=0, max_tokens=24)

with Engine.from_pretrained(model) as engine:
    # Several prompts are batched into the same forward passes.
    for output in engine.generate(["The capital of France is", "Water boils at"], greedy):
        print(repr(output.prompt), "->", repr(output.text), f"({output.finish_reason})")

    # Streaming: text arrives as it is generated.
    for delta in engine.stream("Once upon a time", SamplingParams(temperature=0.8, seed=1, max_tokens=24)):
        print(delta.text, end="", flush=True)
    print()

    # Chat: the model's own chat template is applied.
    reply = engine.chat([{"role": "user", "content": "Name three colours."}], greedy)
    print("assistant:", reply.text)
