"""`chat-cli serve`: the OpenAI-compatible server on an Engine, run by uvicorn until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from chat_cli.server.settings import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_MESSAGES, DEFAULT_MAX_N, DEFAULT_MAX_PROMPTS
from chat_core import Engine

if TYPE_CHECKING:
    from chat_cli.server.state import ServerState

API_KEY_ENV = "CHAT_API_KEY"
# Below Kubernetes' default 30 s between SIGTERM and SIGKILL, with time left to stop the ranks.
DEFAULT_SHUTDOWN_TIMEOUT_S = 20.0


def port_number(text: str) -> int:
    """--port's type: 0 (a free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: expected 0 (any free one) to 65535")
    return port


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1; any other warns without an API key)"
    )
    group.add_argument("--port", type=port_number, default=8000, help="the port to listen on; 0 picks a free one (default: 8000)")
    group.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer <key>' on /v1 (default: ${API_KEY_ENV}, which keeps it out of `ps`; "
        "none when unset)",
    )
    group.add_argument(
        "--allowed-origins",
        type=_origins,
        default=(),
        metavar="ORIGIN[,ORIGIN...]",
        help="browser origins allowed to call the API (CORS), e.g. https://app.example.com, or '*' "
        "(default: none: CORS off)",
    )
    group.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model as given)")
    group.add_argument(
        "--max-waiting-requests", type=_positive, default=256, help="waiting requests before new ones get 429 (default: 256)"
    )
    group.add_argument(
        "--max-tokens-limit", type=_positive, default=None, help="the most max_tokens a request may ask for (default: the context)"
    )
    group.add_argument(
        "--max-body-bytes",
        type=_positive,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"larger bodies get 413 (default: {DEFAULT_MAX_BODY_BYTES})",
    )
    group.add_argument(
        "--max-n", type=_positive, default=DEFAULT_MAX_N, help=f"the most completions per prompt (default: {DEFAULT_MAX_N})"
    )
    group.add_argument(
        "--max-messages",
        type=_positive,
        default=DEFAULT_MAX_MESSAGES,
        help=f"the most messages in a chat request (default: {DEFAULT_MAX_MESSAGES})",
    )
    group.add_argument(
        "--shutdown-timeout",
        type=_non_negative_seconds,
        default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        metavar="SECONDS",
        help="on SIGTERM or Ctrl-C, how long requests in flight may take to finish before they are cancelled; "
        f"new ones get 503 meanwhile, a second signal cancels them at once (default: {DEFAULT_SHUTDOWN_TIMEOUT_S:g})",
    )


def run_serve(engine: Engine, args: argparse.Namespace) -> int:
    import uvicorn

    from chat_cli.server import ServerSettings, build_app
    from chat_core.engine.async_engine import AsyncEngine

    settings = ServerSettings(
        served_model_name=args.served_model_name or args.model,
        api_key=args.api_key or None,
        max_tokens_limit=args.max_tokens_limit,
        max_body_bytes=args.max_body_bytes,
        max_n=args.max_n,
        max_messages=args.max_messages,
        allowed_origins=args.allowed_origins,
        # Each prompt of a completions request waits in the queue as a request of its own: one with more prompts
        # than the queue holds could never be taken (429 however often it is retried), so it is a 400 instead.
        max_prompts=min(DEFAULT_MAX_PROMPTS, args.max_waiting_requests),
    )
    if settings.api_key is None and not _is_loopback(args.host):
        print(
            f"chat-cli: warning: serving on {args.host} without an API key: anyone who can reach this port can use the model; "
            f"set ${API_KEY_ENV} (or --api-key)",
            file=sys.stderr,
            flush=True,
        )
    try:
        listener = _listen(args.host, args.port)
    except OSError as exc:
        print(f"chat-cli: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    # The engine loop gets the main thread (the one that loaded the model: PyTorch's CPU threads are
    # much faster driven from it); HTTP runs on an event loop in a second thread.
    async_engine = AsyncEngine(engine, max_waiting_requests=args.max_waiting_requests, driver="caller")
    app = build_app(async_engine, settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    host, port = listener.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    ready_line = f"serving {settings.served_model_name} on http://{url_host}:{port}"
    signals = _Signals()
    http = threading.Thread(
        target=_serve_http,
        args=(server, listener, ready_line, app.state.server, signals, args.shutdown_timeout),
        name="chat-http",
    )
    try:
        with _signals_caught(signals):
            http.start()
            async_engine.run_forever()  # returns once the HTTP side has stopped it
            http.join()
    finally:
        async_engine.shutdown()
        listener.close()
    return 0


class _Signals:
    """SIGINT/SIGTERM seen so far: the first drains the server, a second cuts the drain short."""

    def __init__(self) -> None:
        self.count = 0

    def handle(self, signum: int, frame: object) -> None:
        self.count += 1


def _serve_http(  # type: ignore[no-untyped-def]
    server, listener: socket.socket, ready_line: str, state: ServerState, signals: _Signals, shutdown_timeout: float
) -> None:
    try:
        asyncio.run(_serve(server, listener, ready_line, state, signals, shutdown_timeout))
    finally:
        state.async_engine.stop()  # however HTTP ended, end the engine loop on the main thread


async def _serve(  # type: ignore[no-untyped-def]
    server, listener: socket.socket, ready_line: str, state: ServerState, signals: _Signals, shutdown_timeout: float
) -> None:
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            print(ready_line, flush=True)  # tests and scripts wait for this line
        while not signals.count and not server.should_exit and not serving.done():
            await asyncio.sleep(0.1)
        if signals.count and not serving.done():
            await _drain(state, signals, shutdown_timeout)
        state.stop_requests()  # what is still open ends now with an error event instead of holding the shutdown
        server.should_exit = True
        await serving
    finally:
        # Stop the engine loop while this event loop is open: it may still be delivering outputs to it.
        state.async_engine.stop()


async def _drain(state: ServerState, signals: _Signals, timeout: float) -> None:
    """Refuse new requests (503) while those in flight finish, for at most `timeout` seconds or until a second signal."""
    state.start_draining()
    in_flight = len(state.groups)
    print(
        f"chat-cli: shutting down: {in_flight} request(s) in flight may take up to {timeout:g} s to finish; new ones get 503",
        file=sys.stderr,
        flush=True,
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while state.groups and signals.count < 2 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    left = len(state.groups)
    why = "a second signal" if signals.count >= 2 else f"the {timeout:g} s grace period"
    ended = f"{in_flight - left} of {in_flight} request(s) in flight ended"
    print(f"chat-cli: {ended}; {left} cut short by {why}" if left else f"chat-cli: {ended}", file=sys.stderr, flush=True)


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket, so that --port 0 has its real port before uvicorn starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(2048)
    return listener


@contextmanager
def _signals_caught(signals: _Signals) -> Iterator[None]:
    """SIGINT/SIGTERM are counted by `signals`, also before uvicorn starts (it installs no handlers off the main thread).

    Landing here instead of in the default handler lets the server drain, the engine (and any worker
    processes) shut down and the command exit 0.
    """
    previous = {sig: signal.signal(sig, signals.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text}")
    return value


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(origin.strip().rstrip("/") for origin in text.split(","))
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise argparse.ArgumentTypeError(f"expected origins like https://app.example.com or '*', got {origin!r}")
    return origins


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
