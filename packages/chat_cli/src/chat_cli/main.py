"""`chat-cli`: generate, chat and serve, on one process or several (--tp/--pp, or under torchrun)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from chat_cli.options import add_engine_options, add_sampling_options, engine_kwargs, sampling_params
from chat_cli.version import VersionAction


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-cli", description="Run Llama-family models locally or distributed.")
    parser.add_argument("--version", action=VersionAction)
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

    from chat_cli.serve import add_serve_options

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server")
    add_engine_options(serve)
    add_serve_options(serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # what can be checked without the model, before it loads
        check_options(args)
    except ValueError as exc:
        print(f"chat-cli: error: {exc}", file=sys.stderr)
        return 2
    kwargs = engine_kwargs(args)
    apply_torchrun_world(kwargs)
    if torchrun_rank() > 0:
        # Under torchrun every rank runs this same command; only rank 0 reads input and prints.
        from chat_core import EngineConfig, open_checkpoint
        from chat_distributed import run_torchrun_worker

        if args.command == "serve":
            # torchrun forwards SIGTERM (and a terminal's Ctrl-C reaches every rank): rank 0 drains the server,
            # then stops this rank itself; dying now would fail the answers it lets finish.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)

        config = EngineConfig(model=args.model, **kwargs)
        try:  # rank 0's checks, made here too: a rank that failed them alone would wait for rank 0 until timeout
            checkpoint = open_checkpoint(config.model)
            config.resolved_for(checkpoint)
        except (ValueError, OSError) as exc:
            print(f"chat-cli: error: {exc}", file=sys.stderr)
            return 2
        run_torchrun_worker(config, checkpoint)
        return 0

    from chat_core import Engine
    from chat_distributed import WorkerFailedError

    try:
        engine = Engine.from_pretrained(args.model, **kwargs)
    except (ValueError, ImportError, OSError) as exc:
        print(f"chat-cli: error: {exc}", file=sys.stderr)
        return 2
    except WorkerFailedError as exc:  # a rank failed while starting: its error, without our traceback
        print(f"chat-cli: error: {exc}", file=sys.stderr)
        return 1
    with engine:
        if args.command == "generate":
            from chat_cli.generate import run_generate

            return run_generate(engine, args)
        if args.command == "serve":
            from chat_cli.serve import run_serve

            return run_serve(engine, args)
        from chat_cli.chat import run_chat

        return run_chat(engine, args)


def check_options(args: argparse.Namespace) -> None:
    """The sampling options of generate and chat, and options that only mean something beside another."""
    if args.command in ("generate", "chat"):
        sampling_params(args)
    if args.group_size is not None and args.quantize != "int4":
        raise ValueError(f"--group-size {args.group_size} is the int4 group size: it needs --quantize int4 (got --quantize {args.quantize})")


def torchrun_rank() -> int:
    """This process's rank when started by torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def apply_torchrun_world(kwargs: dict) -> None:
    """Under torchrun without --tp/--pp, every process is a tensor-parallel rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and kwargs["tensor_parallel_size"] * kwargs["pipeline_parallel_size"] == 1:
        kwargs["tensor_parallel_size"] = world


if __name__ == "__main__":
    sys.exit(main())
