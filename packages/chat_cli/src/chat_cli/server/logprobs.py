"""The engine's `Logprob`s in OpenAI's two shapes: chat (`content` entries) and text completions (parallel lists)."""

from __future__ import annotations

from chat_cli.server.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from chat_core import Logprob

_FLOOR = -9999.0  # JSON has no -inf; a token the model rules out still needs a number


def _value(logprob: Logprob) -> float:
    return max(logprob.logprob, _FLOOR)


def _top(logprob: Logprob) -> TopLogprob:
    return TopLogprob(token=logprob.token, logprob=_value(logprob), bytes=list(logprob.token.encode("utf-8")))


def chat_logprobs(chosen: list[Logprob], top: list[list[Logprob]] | None) -> ChatLogprobs:
    content = []
    for position, logprob in enumerate(chosen):
        alternatives = [_top(t) for t in top[position]] if top else []
        content.append(TokenLogprob(**_top(logprob).model_dump(), top_logprobs=alternatives))
    return ChatLogprobs(content=content)


def completion_logprobs(chosen: list[Logprob], top: list[list[Logprob]] | None, text_offset: int) -> CompletionLogprobs:
    """`text_offset` is where the first token starts in the completion's text."""
    offsets = []
    for logprob in chosen:
        offsets.append(text_offset)
        text_offset += len(logprob.token)
    return CompletionLogprobs(
        tokens=[t.token for t in chosen],
        token_logprobs=[_value(t) for t in chosen],
        top_logprobs=[{t.token: _value(t) for t in alternatives} for alternatives in top] if top else None,
        text_offset=offsets,
    )
