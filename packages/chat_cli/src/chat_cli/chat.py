"""`chat-cli chat`: an interactive conversation in the terminal, with the model's chat template."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from chat_core import Engine, PromptTooLongError, SamplingParams

from chat_cli.options import sampling_params

HELP = "Commands: /reset clears the conversation, /exit quits (Ctrl-D and Ctrl-C too)."


def run_chat(engine: Engine, args: argparse.Namespace, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    params = sampling_params(args)
    interactive = stdin.isatty()
    system: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    if interactive:
        print(HELP, file=stdout)
    while True:
        try:
            if interactive:
                stdout.write("> ")
                stdout.flush()
            line = stdin.readline()
        except KeyboardInterrupt:
            break
        if not line:  # end of input (Ctrl-D)
            break
        user = line.rstrip("\n")
        if not user.strip():
            continue
        if user.strip() == "/exit":
            break
        if user.strip() == "/reset":
            messages = list(system)
            print("[conversation cleared]", file=stdout)
            continue
        messages.append({"role": "user", "content": user})
        reply = []
        try:
            for delta in _stream_within_context(engine, messages, params, len(system)):
                reply.append(delta.text)
                stdout.write(delta.text)
                stdout.flush()
        except KeyboardInterrupt:
            stdout.write(" [interrupted]")
        except PromptTooLongError as exc:  # even alone (with the system prompt), this message does not fit
            messages.pop()
            print(f"[not sent: {exc}]", file=stdout)
            continue
        stdout.write("\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
    if interactive:
        stdout.write("\n")
    return 0


def _stream_within_context(engine: Engine, messages: list[dict[str, Any]], params: SamplingParams, kept: int) -> Iterator[Any]:
    """`engine.stream_chat(messages)`; while the conversation outgrows the context, its oldest exchange (after
    the first `kept` messages: the system prompt) is dropped from `messages`, said on stderr, and it is tried
    again. Raises PromptTooLongError when only the last message is left and it still does not fit."""
    while True:
        deltas = engine.stream_chat(messages, params)
        try:
            first = next(deltas, None)  # the prompt is checked as it is submitted
        except PromptTooLongError:
            if len(messages) - kept <= 1:
                raise
            del messages[kept : kept + 2]  # the oldest user message and its answer
            print("[the conversation outgrew the context: its oldest exchange was dropped]", file=sys.stderr)
            continue
        if first is not None:
            yield first
        yield from deltas
        return
