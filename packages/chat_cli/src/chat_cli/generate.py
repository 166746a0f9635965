"""`chat-cli generate PROMPT`: stream one completion to stdout, then the timing to stderr."""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from chat_core import Engine

from chat_cli.options import sampling_params


def run_generate(engine: Engine, args: argparse.Namespace) -> int:
    params = sampling_params(args)
    # From stdin without the newline that ends its last line (`echo ... |`): the model would read it as text.
    prompt = args.prompt if args.prompt is not None else sys.stdin.read().rstrip("\n")
    if args.chat_template:
        prompt = engine.chat_prompt([{"role": "user", "content": prompt}])
    start = time.perf_counter()
    first_token_at = None
    num_tokens = 0
    deltas = engine.stream(prompt, params)
    try:
        first = next(deltas, None)  # the prompt is checked as it is submitted: empty, too long, ...
    except ValueError as exc:
        print(f"chat-cli: error: {exc}", file=sys.stderr)
        return 2
    for delta in itertools.chain([first] if first is not None else [], deltas):
        if first_token_at is None:
            first_token_at = time.perf_counter()
        num_tokens += len(delta.token_ids)
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    end = time.perf_counter()
    sys.stdout.write("\n")
    sys.stdout.flush()  # the answer, then the timing, even when both go to one terminal
    ttft = (first_token_at or end) - start
    decode_rate = (num_tokens - 1) / (end - first_token_at) if first_token_at and num_tokens > 1 and end > first_token_at else 0.0
    print(
        f"[{num_tokens} tokens; time to first token {ttft * 1000:.0f} ms; {decode_rate:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0
