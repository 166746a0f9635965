"""What the scheduler decided for one step: plain Python data, picklable, small, no device tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

from chat_core.sampling_params import SamplingParams


@dataclass(frozen=True)
class ScheduledSequence:
    """One sequence's share of a step: the tokens to feed and where their keys and values live."""

    seq_id: int
    token_ids: list[int]  # the tokens fed this step: a prefill chunk, or the last sampled token
    start_position: int  # position of token_ids[0] in the sequence (= tokens already in the KV cache)
    block_table: list[int]  # the KV-cache blocks of this sequence, in order
    sampling_params: SamplingParams
    do_sample: bool  # False for a prefill chunk that does not reach the end of the prompt
    seed: int | None = None  # this sequence's own seed (a request with n > 1 derives one per sequence)
    output_index: int = 0  # how many tokens it has generated: the seeded random stream's position
    # Only sent when the sequence uses penalties: the token counts they need.
    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        """Tokens in the KV cache once this step has run."""
        return self.start_position + len(self.token_ids)


@dataclass(frozen=True)
class ExecuteModelRequest:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)  # sequences whose per-worker state can go

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)
