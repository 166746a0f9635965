"""The engine's `Logprob`s in OpenAI's two shapes: chat (`content` entries) and text completions (parallel lists)."""

from __future__ import annotations

from chat_cli.server.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from chat_core import Logprob

_FLOOR = -9999.0  # JSON has no -inf; a token the model rules out still needs a number


def _value(logprob: Logprob) -> float:
    return max(logprob.logprob, _FLOOR)


def _top(logprob: Logprob) -> TopLogprob:
    # The token's own bytes, not its text's: `token` has U+FFFD for part of a character (as vLLM's;
    # OpenAI is reported to write such bytes escaped, "\xe3\x81"), and `bytes` is what clients join
    # across tokens to rebuild that character.
    return TopLogprob(token=logprob.token, logprob=_value(logprob), bytes=list(logprob.token_bytes))


def chat_logprobs(chosen: list[Logprob], top: list[list[Logprob]] | None) -> ChatLogprobs:
    content = []
    for position, logprob in enumerate(chosen):
        alternatives = [_top(t) for t in top[position]] if top else []
        content.append(TokenLogprob(**_top(logprob).model_dump(), top_logprobs=alternatives))
    return ChatLogprobs(content=content)


def completion_logprobs(chosen: list[Logprob], top: list[list[Logprob]] | None, text_offset: int) -> CompletionLogprobs:
    """Each token's `text_offset` is the one the engine gave it (see `Logprob.text_offset`).

    The engine's offsets follow the text as decoded, where a token holding part of a character
    adds no character of its own, so summing the lengths of `token`s would drift. `text_offset`
    (where the first token starts) is used only for tokens without one, made outside the engine.
    """
    offsets = []
    for logprob in chosen:
        offsets.append(logprob.text_offset if logprob.text_offset is not None else text_offset)
        text_offset = offsets[-1] + len(logprob.token)
    return CompletionLogprobs(
        tokens=[t.token for t in chosen],
        token_logprobs=[_value(t) for t in chosen],
        top_logprobs=[{t.token: _value(t) for t in alternatives} for alternatives in top] if top else None,
        text_offset=offsets,
    )
