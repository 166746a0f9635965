"""`chat-cli serve`: the OpenAI-compatible server on an Engine, run by uvicorn until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from chat_core import Engine

if TYPE_CHECKING:
    from chat_cli.server.state import ServerState

DEFAULT_MAX_BODY_BYTES = 1 << 20


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    group.add_argument("--port", type=int, default=8000, help="the port to listen on; 0 picks a free one (default: 8000)")
    group.add_argument(
        "--api-key",
        default=os.environ.get("CHAT_API_KEY"),
        help="require 'Authorization: Bearer <key>' on /v1 (default: $CHAT_API_KEY; none when unset)",
    )
    group.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model as given)")
    group.add_argument(
        "--max-waiting-requests", type=_positive, default=256, help="waiting requests before new ones get 429 (default: 256)"
    )
    group.add_argument("--max-tokens-limit", type=_positive, default=None, help="the most max_tokens a request may ask for")
    group.add_argument(
        "--max-body-bytes",
        type=_positive,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"larger bodies get 413 (default: {DEFAULT_MAX_BODY_BYTES})",
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
    http = threading.Thread(target=_serve_http, args=(server, listener, ready_line, app.state.server), name="chat-http")
    try:
        with _signals_stop(server):
            http.start()
            async_engine.run_forever()  # returns once the HTTP side has stopped it
            http.join()
    finally:
        async_engine.shutdown()
        listener.close()
    return 0


def _serve_http(server, listener: socket.socket, ready_line: str, state: ServerState) -> None:  # type: ignore[no-untyped-def]
    try:
        asyncio.run(_serve(server, listener, ready_line, state))
    finally:
        state.async_engine.stop()  # however HTTP ended, end the engine loop on the main thread


async def _serve(server, listener: socket.socket, ready_line: str, state: ServerState) -> None:  # type: ignore[no-untyped-def]
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            print(ready_line, flush=True)  # tests and scripts wait for this line
        while not server.should_exit and not serving.done():
            await asyncio.sleep(0.1)
        state.stop_requests()  # open streams end now with an error event instead of holding the shutdown
        await serving
    finally:
        # Stop the engine loop while this event loop is open: it may still be delivering outputs to it.
        state.async_engine.stop()


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket, so that --port 0 has its real port before uvicorn starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(2048)
    return listener


@contextmanager
def _signals_stop(server) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """SIGINT/SIGTERM ask the server to stop, also before uvicorn installs its own handlers.

    uvicorn re-raises the signal after its graceful shutdown; landing here instead of in the default
    handler lets the engine (and any worker processes) shut down and the command exit 0.
    """

    def stop(signum: int, frame: object) -> None:
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
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
