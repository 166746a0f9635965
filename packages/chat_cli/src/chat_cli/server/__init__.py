"""The OpenAI-compatible HTTP server: `build_app(AsyncEngine(engine), ServerSettings(...))` is an ASGI app."""

from chat_cli.server.app import build_app
from chat_cli.server.settings import ServerSettings

__all__ = ["ServerSettings", "build_app"]
