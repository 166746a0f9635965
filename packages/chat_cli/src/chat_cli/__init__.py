"""chat-cli: generate, chat and an OpenAI-compatible server."""
