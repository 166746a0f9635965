"""The engine's record of one generated sequence: its tokens, where its KV cache lives, and its state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from chat_core.outputs import Logprob
from chat_core.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n completions this is
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose keys and values are in the cache
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache when first scheduled
    # Kept by the block manager for prefix caching: the hash of each full block of tokens so far, and
    # how many leading blocks of block_table are known to the cache (taken from it or registered).
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_preemptions: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[Logprob] = field(default_factory=list)
    top_logprobs: list[list[Logprob]] = field(default_factory=list)

    @property
    def seed(self) -> int | None:
        base = self.sampling_params.seed
        return None if base is None else base + 1_000_003 * self.index

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, count: int) -> list[int]:
        prompt_len = len(self.prompt_token_ids)
        if start + count <= prompt_len:
            return self.prompt_token_ids[start : start + count]
        return (self.prompt_token_ids + self.output_token_ids)[start : start + count]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
