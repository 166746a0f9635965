"""What comes out of a model step (SamplerOutput, IntermediateOutput) and out of the engine (RequestOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chat_core.tensor_dict import TensorDictMixin


@dataclass(frozen=True)
class IntermediateOutput(TensorDictMixin):
    """What a pipeline stage other than the last hands to the next: hidden states and the residual stream."""

    hidden_states: torch.Tensor  # [tokens, hidden_size]
    residual: torch.Tensor  # [tokens, hidden_size]


@dataclass(frozen=True)
class SamplerOutput(TensorDictMixin):
    """The tokens sampled in one step, one row per sequence that sampled (same order as scheduled)."""

    seq_ids: list[int]
    sampled_token_ids: torch.Tensor  # [num_sampled] int64
    sampled_logprobs: torch.Tensor | None = None  # [num_sampled] float32: log-prob of the chosen token
    top_token_ids: torch.Tensor | None = None  # [num_sampled, k] int64
    top_logprobs: torch.Tensor | None = None  # [num_sampled, k] float32


@dataclass(frozen=True)
class Logprob:
    """A token's log-probability under the model's distribution (before temperature and filtering).

    `token_bytes` are the token's own bytes, which may be part of a UTF-8 character (CJK and emoji are
    often split across tokens); `token` is those bytes decoded with U+FFFD for any that do not form
    whole characters, as vLLM and `tokenizers` render a lone token. So the `token`s of a completion
    need not join into its text, while the `token_bytes` of its shown tokens join into its UTF-8.
    """

    token_id: int
    logprob: float
    token: str = ""
    token_bytes: bytes = b""
    # For a generated token (not a top-n alternative): the index in the completion's text of the first
    # character it contributes to. A token that starts inside a character (its first bytes finish one
    # begun by earlier tokens) gets that character's index, since no offset falls inside a character.
    text_offset: int | None = None


@dataclass(repr=False)
class CompletionOutput:
    """One generated sequence of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", or None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it, if any
    logprobs: list[Logprob] | None = None  # the chosen token at each step
    top_logprobs: list[list[Logprob]] | None = None  # the top-n alternatives at each step

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:  # short: a cell or a log line shows what was generated, not every logprob
        logprobs = f", logprobs={len(self.logprobs)}" if self.logprobs is not None else ""
        return (
            f"CompletionOutput(index={self.index}, text={abbreviate(self.text)}, "
            f"finish_reason={self.finish_reason!r}, tokens={len(self.token_ids)}{logprobs})"
        )


@dataclass(repr=False)
class RequestOutput:
    """The state of a request after a step: its prompt and every completion so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    # Prompt tokens whose keys and values came from the prefix cache (not computed) when the request was
    # first scheduled; with n > 1, those of its first completion (the others share its prompt blocks).
    num_cached_tokens: int = 0

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

    def __repr__(self) -> str:
        if len(self.outputs) == 1:
            completion = self.outputs[0]
            shown = f"text={abbreviate(completion.text)}, finish_reason={completion.finish_reason!r}"
        else:
            shown = f"outputs={self.outputs!r}"
        return (
            f"RequestOutput(request_id={self.request_id!r}, {shown}, "
            f"prompt_tokens={self.num_prompt_tokens}, completion_tokens={self.num_completion_tokens})"
        )


def abbreviate(text: str, limit: int = 60) -> str:
    """`text`'s repr, cut to about `limit` characters with an ellipsis."""
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")
