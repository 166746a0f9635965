"""How to pick the next token and when to stop; validated when constructed."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
_INT64_MAX = 2**63 - 1  # what reaches a tensor must fit in one
_FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True, repr=False)
class SamplingParams:
    """Sampling and stopping settings of one request (the names and meanings of vLLM's and OpenAI's).

    temperature 0 is greedy. top_k 0 (or -1) and top_p 1 turn those filters off. logprobs=None
    returns none, logprobs=0 the chosen token's, logprobs=n also the n most likely tokens'.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and stored as tuples so the params stay hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: expected {expected}")

        check(_is_int(self.n) and self.n >= 1, "n", "an integer >= 1")
        check(_is_number(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0")
        check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        check(_is_int(self.top_k) and 0 <= self.top_k <= _INT64_MAX, "top_k", "an integer >= 0 (0 or -1 disables it)")
        check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "a number in [0, 1]")
        check(self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**64), "seed", "a 64-bit integer or None")
        check(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            "max_tokens",
            "an integer >= 1 or None (up to the context length)",
        )
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings")
        check(all(_is_int(t) and 0 <= t <= _INT64_MAX for t in self.stop_token_ids), "stop_token_ids", "token ids (integers >= 0)")
        check(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs",
            f"None or an integer in [0, {MAX_LOGPROBS}]",
        )
        check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty", "a number > 0")
        check(_is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty", "a number in [-2, 2]")
        check(
            _is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty", "a number in [-2, 2]"
        )

    def __repr__(self) -> str:  # only what differs from the defaults: `SamplingParams(temperature=0, max_tokens=64)`
        fields = dataclasses.fields(self)
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields if getattr(self, f.name) != _default(f)]
        return f"SamplingParams({', '.join(changed)})"

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _default(f: dataclasses.Field) -> object:  # type: ignore[type-arg]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    # NaN, infinities and numbers beyond a float32 would reach the logits and spoil every sequence of the batch.
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and abs(value) <= _FLOAT32_MAX
    except OverflowError:  # an int too large for a float
        return False
