"""What the HTTP layer needs to know besides the engine: names, limits, the API key."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str
    api_key: str | None = None  # None: no authentication
    max_tokens_limit: int | None = None  # None: a request may generate up to the context length
    max_body_bytes: int = 1 << 20
    max_n: int = 16  # completions per request: each one is a sequence in the batch

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("ServerSettings.served_model_name is empty: expected the name clients send as `model`")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError(f"ServerSettings.max_tokens_limit={self.max_tokens_limit!r} is invalid: expected an integer >= 1")
        if self.max_body_bytes < 1:
            raise ValueError(f"ServerSettings.max_body_bytes={self.max_body_bytes!r} is invalid: expected an integer >= 1")
