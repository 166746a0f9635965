"""What the HTTP layer needs to know besides the engine: names, limits, the API key, the origins allowed."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_N = 16
DEFAULT_MAX_MESSAGES = 1024
DEFAULT_MAX_PROMPTS = 256


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str
    api_key: str | None = None  # None: no authentication
    max_tokens_limit: int | None = None  # None: a request may generate up to the context length
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_n: int = DEFAULT_MAX_N  # completions per prompt: each one is a sequence in the batch
    max_messages: int = DEFAULT_MAX_MESSAGES  # messages in one chat request
    max_prompts: int = DEFAULT_MAX_PROMPTS  # prompts in one completions request: each one is an engine request
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed by CORS; none: no CORS headers at all

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("ServerSettings.served_model_name is empty: expected the name clients send as `model`")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError(f"ServerSettings.max_tokens_limit={self.max_tokens_limit!r} is invalid: expected an integer >= 1")
        for name in ("max_body_bytes", "max_n", "max_messages", "max_prompts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerSettings.{name}={value!r} is invalid: expected an integer >= 1")
        if isinstance(self.allowed_origins, str) or any(not o for o in self.allowed_origins):
            raise ValueError(
                f"ServerSettings.allowed_origins={self.allowed_origins!r} is invalid: expected a tuple of origins "
                "such as ('https://app.example.com',) or ('*',)"
            )
