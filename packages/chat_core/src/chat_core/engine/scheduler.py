"""Continuous batching: each step, decide which sequences run and how many of their tokens.

Running sequences go first (a decode is one token), then waiting ones are admitted in arrival order
while the step's token budget, the sequence limit and the KV cache allow; a prompt longer than what
is left of the budget is prefilled in chunks over several steps. A sequence that is admitted
computes only what follows the longest prefix the block manager's prefix cache already holds. When
a running sequence needs a block and none is free, the most recently arrived running sequence is
preempted: its blocks are freed and it waits to be recomputed from its tokens so far (from its own
blocks, if they are still cached), never dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from chat_core.engine.block_manager import BlockManager
from chat_core.engine.execute_model_request import ExecuteModelRequest, ScheduledSequence
from chat_core.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name}={getattr(self, name)} must be >= 1")


@dataclass
class SchedulerStats:
    steps: int = 0
    scheduled_sequences: int = 0  # summed over steps: divided by `steps`, the average batch
    max_sequences_in_step: int = 0
    preemptions: int = 0


@dataclass
class ScheduledStep:
    """A step's decision: the sequences with their chunk sizes, and the request sent to the workers."""

    sequences: list[tuple[Sequence, int]] = field(default_factory=list)
    request: ExecuteModelRequest = field(default_factory=ExecuteModelRequest)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()
        self._finished_since_last_step: list[int] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Mark `seq` finished and give its blocks back at once."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._finished_since_last_step.append(seq.seq_id)

    def schedule(self) -> ScheduledStep:
        budget = self.config.max_num_batched_tokens
        step = ScheduledStep()

        # Running sequences first, oldest first; make room by preempting the newest if the cache is full.
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted below while making room for an older one
            if budget == 0:
                break
            chunk = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.can_allocate(seq, seq.num_computed_tokens + chunk):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.block_manager.allocate(seq, seq.num_computed_tokens + chunk)
            step.sequences.append((seq, chunk))
            budget -= chunk

        # Then admit waiting sequences in arrival order while they fit. A waiting sequence has nothing
        # in the cache of its own; it starts after the longest prefix the prefix cache holds.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached_blocks = self.block_manager.find_cached_prefix(seq)
            num_cached = len(cached_blocks) * self.block_manager.block_size
            chunk = min(seq.num_tokens - num_cached, budget)
            if not self.block_manager.can_allocate(seq, num_cached + chunk, cached_blocks):
                break  # wait for running sequences to finish and free blocks
            self.waiting.popleft()
            self.block_manager.allocate(seq, num_cached + chunk, cached_blocks)
            seq.num_computed_tokens = num_cached
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.sequences.append((seq, chunk))
            budget -= chunk

        step.request = ExecuteModelRequest(
            scheduled=[self._scheduled(seq, chunk) for seq, chunk in step.sequences],
            finished_seq_ids=self._finished_since_last_step,
        )
        self._finished_since_last_step = []
        if step.sequences:
            self.stats.steps += 1
            self.stats.scheduled_sequences += len(step.sequences)
            self.stats.max_sequences_in_step = max(self.stats.max_sequences_in_step, len(step.sequences))
        return step

    def _preempt(self, seq: Sequence) -> None:
        # Recompute later: the tokens are kept, only the cache is given up.
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1
        self._finished_since_last_step.append(seq.seq_id)  # workers drop its state; it restarts from scratch

    @staticmethod
    def _scheduled(seq: Sequence, chunk: int) -> ScheduledSequence:
        params = seq.sampling_params
        reaches_end = seq.num_computed_tokens + chunk == seq.num_tokens
        return ScheduledSequence(
            seq_id=seq.seq_id,
            token_ids=seq.token_ids(seq.num_computed_tokens, chunk),
            start_position=seq.num_computed_tokens,
            block_table=list(seq.block_table),
            sampling_params=params,
            do_sample=reaches_end,
            seed=seq.seed,
            output_index=len(seq.output_token_ids),
            prompt_token_ids=seq.prompt_token_ids if params.uses_penalties else None,
            output_token_ids=list(seq.output_token_ids) if params.uses_penalties else None,
        )
