"""Turns generated token ids into text one token at a time, never splitting a UTF-8 character."""

from __future__ import annotations

from collections.abc import Sequence

from chat_core.tokenizer.base import Tokenizer

# Prompt tokens decoded before the first generated one, so a SentencePiece "▁Hello" keeps its space.
PROMPT_CONTEXT_TOKENS = 5

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """The prefix/read-offset method of vLLM and TGI.

    Each push decodes a short window of recent ids twice, without and with the new tokens, and
    emits the difference. The window starts a token or more before the text not yet emitted,
    because a token's text depends on its left neighbour (a leading space stripped only at the
    start, bytes of one character split across tokens). Text that ends in U+FFFD is held back
    until later tokens complete the character.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # where the decoded window starts
        self._read_offset = len(self._ids)  # ids before this have had their text emitted
        self._text = ""
        self._held_chars = 0  # whole characters held back in front of an unfinished one

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._text

    @property
    def next_offset(self) -> int:
        """Where the text of the next pushed id starts in the final text (OpenAI's `text_offset`).

        That is after the emitted text and the whole characters held back with an unfinished one.
        An id whose first bytes finish that character gets the character's own index: no offset
        falls inside a character. (Held-back U+FFFDs are taken as the unfinished character's,
        so a stray invalid byte just before one may count one character short.)
        """
        return len(self._text) + self._held_chars

    def push(self, token_id: int) -> str:
        """Adds one generated id; returns the text it finished (often "", e.g. mid-character)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text):
            return ""
        if new_text.endswith(_REPLACEMENT):
            self._held_chars = len(new_text[len(prefix_text) :].rstrip(_REPLACEMENT))
            return ""
        return self._emit(new_text[len(prefix_text) :])

    def flush(self) -> str:
        """At the end of generation: the held-back text, whose bytes never completed (so it has U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        return self._emit(new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else "")

    def _emit(self, delta: str) -> str:
        # The window moves up to the ids just emitted; older ids are no longer needed.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self._held_chars = 0
        self._text += delta
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
