"""Server-sent events: what each step added to each choice, framed as `data: {...}` lines."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from chat_core import Logprob, RequestOutput

DONE = "data: [DONE]\n\n"


def event(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


class EventStreamResponse(StreamingResponse):
    """A text/event-stream whose body generator is always closed, however the response ends.

    Closing it is what aborts the engine requests behind it when the client goes away.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncGenerator[str, None], cleanup: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.cleanup = cleanup  # also run when the body never started (the client left before the first byte)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self.cleanup()


@dataclass
class ChoiceDelta:
    index: int  # the choice's index in the response: prompt index * n + completion index
    text: str
    logprobs: list[Logprob]
    top_logprobs: list[list[Logprob]] | None
    text_offset: int  # where the first of `logprobs` starts: the length of the tokens sent before it
    finish_reason: str | None  # set once, in the delta that finishes the choice


class DeltaTracker:
    """Remembers what was sent of every choice, to send only what is new."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._sent_chars: dict[int, int] = {}
        self._sent_tokens: dict[int, int] = {}
        self._sent_token_chars: dict[int, int] = {}
        self._finished: set[int] = set()
        self.latest: dict[int, RequestOutput] = {}  # prompt index -> its latest output, for usage

    def deltas(self, prompt_index: int, output: RequestOutput) -> list[ChoiceDelta]:
        self.latest[prompt_index] = output
        deltas = []
        for completion in output.outputs:
            index = prompt_index * self.n + completion.index
            if index in self._finished:
                continue
            chars, tokens = self._sent_chars.get(index, 0), self._sent_tokens.get(index, 0)
            text = completion.text[chars:]
            logprobs = (completion.logprobs or [])[tokens:]
            top = completion.top_logprobs[tokens:] if completion.top_logprobs is not None else None
            if not text and not logprobs and completion.finish_reason is None:
                continue
            self._sent_chars[index] = len(completion.text)
            self._sent_tokens[index] = len(completion.token_ids)
            offset = self._sent_token_chars.get(index, 0)
            self._sent_token_chars[index] = offset + sum(len(logprob.token) for logprob in logprobs)
            if completion.finish_reason is not None:
                self._finished.add(index)
            deltas.append(ChoiceDelta(index, text, logprobs, top, offset, completion.finish_reason))
        return deltas

    def num_completion_tokens(self) -> int:
        return sum(output.num_completion_tokens for output in self.latest.values())

    def num_cached_tokens(self) -> int:
        return sum(output.num_cached_tokens for output in self.latest.values())
