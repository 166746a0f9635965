"""The generation loop: requests in, one scheduled step at a time through an executor, outputs back.

The same Generator serves `Engine.generate`, `Engine.stream`, chat and the server. It knows nothing
about processes: whether the executor's workers are local or spread over ranks is the executor's
business.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceOf
from typing import Any

from chat_core.engine.block_manager import BlockManager
from chat_core.engine.executor import Executor
from chat_core.engine.output_processor import CompletionState, OutputProcessor, RequestState
from chat_core.engine.scheduler import Scheduler, SchedulerConfig
from chat_core.engine.sequence import Sequence
from chat_core.outputs import RequestOutput
from chat_core.sampling_params import SamplingParams


class PromptTooLongError(ValueError):
    """The prompt leaves no room in the context for a generated token."""


class Generator:
    def __init__(
        self,
        executor: Executor,
        tokenizer: Any | None,
        *,
        scheduler_config: SchedulerConfig,
        block_size: int,
        vocab_size: int,
        eos_token_ids: tuple[int, ...],
        enable_prefix_caching: bool = True,
    ) -> None:
        self.executor = executor
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.vocab_size = vocab_size
        self.block_manager = BlockManager(executor.num_kv_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
        # A sequence can never outgrow the whole cache, or it would preempt itself forever.
        self.max_model_len = min(scheduler_config.max_model_len, executor.num_kv_blocks * block_size)
        self.scheduler = Scheduler(scheduler_config, self.block_manager)
        self.output_processor = OutputProcessor(tokenizer, eos_token_ids, self.max_model_len)
        self._requests: dict[str, RequestState] = {}
        self._completions: dict[int, CompletionState] = {}
        self._seq_ids = itertools.count()

    # Requests
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: SequenceOf[int],
        params: SamplingParams,
        prompt: str | None = None,
    ) -> None:
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_token_ids = list(prompt_token_ids)
        self._validate_prompt(prompt_token_ids, params)
        state = RequestState(request_id, prompt, prompt_token_ids, params)
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, index, prompt_token_ids, params)
            detokenizer = None
            if self.tokenizer is not None:
                from chat_core.tokenizer import IncrementalDetokenizer

                detokenizer = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens
                )
            completion = CompletionState(seq, detokenizer)
            state.completions.append(completion)
            self._completions[seq.seq_id] = completion
            self.scheduler.add(seq)
        self._requests[request_id] = state

    def _validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_token_ids)} tokens, but the context holds {self.max_model_len} "
                "tokens in all; shorten the prompt so at least one token can be generated"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this checkpoint has none; use stop_token_ids")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its cache; returns its final state, or None if it is unknown or done."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        for completion in state.completions:
            if not completion.seq.is_finished:
                self.scheduler.finish(completion.seq, "abort")
            self._completions.pop(completion.seq.seq_id, None)
        return state.output()

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    # The loop
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns the state of every request that changed in it."""
        step = self.scheduler.schedule()
        if not step.sequences:
            return []
        try:
            output = self.executor.execute_model(step.request)
        except BaseException:
            # The blocks this step was to fill are cached already, but may be half-written.
            for seq, _ in step.sequences:
                self.block_manager.forget_uncomputed_blocks(seq)
            raise
        for seq, chunk in step.sequences:
            seq.num_computed_tokens += chunk
        changed: dict[str, RequestState] = {}
        for completion, finish_reason, stop_reason in self.output_processor.append_tokens(output, self._completions):
            seq = completion.seq
            if finish_reason is not None:
                self.scheduler.finish(seq, finish_reason, stop_reason)
            changed[seq.request_id] = self._requests[seq.request_id]
        outputs = []
        for request_id, state in changed.items():
            outputs.append(state.output())
            if state.finished:
                del self._requests[request_id]
                for completion in state.completions:
                    self._completions.pop(completion.seq.seq_id, None)
        return outputs
