"""`chat-cli chat`: an interactive conversation in the terminal, with the model's chat template."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from chat_core import Engine

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
            for delta in engine.stream_chat(messages, params):
                reply.append(delta.text)
                stdout.write(delta.text)
                stdout.flush()
        except KeyboardInterrupt:
            stdout.write(" [interrupted]")
        stdout.write("\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
    if interactive:
        stdout.write("\n")
    return 0
