"""`chat-cli serve`: placeholder until the server lands (see the serving issue)."""

from __future__ import annotations

import argparse


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1")
    group.add_argument("--port", type=int, default=8000)


def run_serve(engine, args: argparse.Namespace) -> int:
    raise SystemExit("chat-cli serve is not implemented yet")
