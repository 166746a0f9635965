"""chat-cli: generate, chat and an OpenAI-compatible server."""

__version__ = "0.1.0"  # the package's only version number: pyproject.toml reads it
