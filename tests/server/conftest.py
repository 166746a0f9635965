"""Real `python -m chat_cli serve` processes, started once per session, always stopped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from server_process import (
    SMOLLM2_MAX_BODY_BYTES,
    SMOLLM2_MAX_MODEL_LEN,
    SMOLLM2_MAX_TOKENS_LIMIT,
    SMOLLM2_NAME,
    TINY_API_KEY,
    ServerProcess,
    start_server,
    stop_server,
)


@pytest.fixture(scope="session")
def smollm2_server(smollm2_path, tmp_path_factory) -> Iterator[ServerProcess]:
    server = start_server(
        "--model", smollm2_path,
        "--served-model-name", SMOLLM2_NAME,
        "--max-model-len", str(SMOLLM2_MAX_MODEL_LEN),
        "--max-tokens-limit", str(SMOLLM2_MAX_TOKENS_LIMIT),
        "--max-body-bytes", str(SMOLLM2_MAX_BODY_BYTES),
        log_dir=str(tmp_path_factory.mktemp("serve-logs")),
    )  # fmt: skip
    try:
        yield server
    finally:
        stop_server(server.process)


@pytest.fixture(scope="session")
def tiny_server(tiny_chat_model, tmp_path_factory) -> Iterator[ServerProcess]:
    """The tiny random chat model, with an API key taken from the environment."""
    server = start_server(
        "--model",
        tiny_chat_model,
        log_dir=str(tmp_path_factory.mktemp("serve-logs")),
        env={"CHAT_API_KEY": TINY_API_KEY},
        api_key=TINY_API_KEY,
    )
    try:
        yield server
    finally:
        stop_server(server.process)
