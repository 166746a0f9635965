"""`chat-cli`: generate, chat and serve, on one process or several (--tp/--pp, or under torchrun)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from chat_cli.options import add_engine_options, add_sampling_options, engine_kwargs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-cli", description="Run Llama-family models locally or distributed.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete a prompt and print it as it is generated")
    generate.add_argument("prompt", nargs="?", default=None, help="the prompt (read from stdin when omitted)")
    generate.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user message")
    add_engine_options(generate)
    add_sampling_options(generate, max_tokens=128)

    chat = commands.add_parser("chat", help="an interactive conversation")
    chat.add_argument("--system", default=None, help="a system prompt")
    add_engine_options(chat)
    add_sampling_options(chat, max_tokens=512)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from chat_core import Engine

    try:
        engine = Engine.from_pretrained(args.model, **engine_kwargs(args))
    except (ValueError, ImportError, OSError) as exc:
        print(f"chat-cli: error: {exc}", file=sys.stderr)
        return 2
    with engine:
        if args.command == "generate":
            from chat_cli.generate import run_generate

            return run_generate(engine, args)
        from chat_cli.chat import run_chat

        return run_chat(engine, args)


if __name__ == "__main__":
    sys.exit(main())
