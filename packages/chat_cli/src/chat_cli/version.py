"""`chat-cli --version`: the versions of our three packages and of the PyTorch they run on."""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import chat_cli

CLI_DISTRIBUTION = "chat-core-cli"  # PyPI's `chat-cli` is another project; the command keeps the name
DEPENDENCIES = ("chat-core", "chat-distributed", "torch")


def version_report() -> str:
    """One line per package, read from installed metadata (no heavy imports)."""
    lines = [f"chat-cli {chat_cli.__version__} (pip install {CLI_DISTRIBUTION})"]
    lines += [f"{distribution} {installed_version(distribution)}" for distribution in DEPENDENCIES]
    lines.append(f"Python {platform.python_version()}")
    return "\n".join(lines)


def installed_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


class VersionAction(argparse.Action):
    """Like argparse's `version` action, but the report is only built when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        kwargs.setdefault("help", "print the versions of chat-cli, chat-core, chat-distributed, torch and Python, then exit")
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        print(version_report(), file=sys.stdout)
        parser.exit()
