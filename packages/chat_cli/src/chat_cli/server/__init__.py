"""The OpenAI-compatible HTTP server: `build_app(AsyncEngine(engine), ServerSettings(...))` is an ASGI app."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chat_cli.server.app import build_app
    from chat_cli.server.settings import ServerSettings

__all__ = ["ServerSettings", "build_app"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `chat-cli generate` reads the server's defaults (settings.py) but never loads FastAPI.
    if name == "build_app":
        from chat_cli.server.app import build_app

        return build_app
    if name == "ServerSettings":
        from chat_cli.server.settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
