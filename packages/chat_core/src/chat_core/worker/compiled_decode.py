"""CPU decode steps run through `torch.compile` (inductor): the CPU's counterpart of `cuda_graphs`.

An eager decode step on CPU is a thousand small ops (norms, casts, rotary, residual adds around each
layer's products), each paying the dispatcher's few microseconds. Compiled, the model's forward becomes one
call whose elementwise work is fused into a few C++ loops per layer; the quantized products and the
attention (`chat_core::cached_attention`, opaque to the compiler: its gathers change shape every step)
are called as they are (README: measured speed and start-up).

Only pure decode steps of a single-rank engine are compiled (prefills and mixed steps stay eager; a gloo
all-reduce or a pipeline hand-over would split the graph). Every length is symbolic, so three graphs serve
all decode steps: batch 1, and batch 2 or more with padded or with blockwise attention; `warm_up` compiles
them at start-up. Inductor keeps what it compiled in its on-disk cache (`TORCHINDUCTOR_CACHE_DIR`, here
`~/.cache/chat-core/inductor` unless set), so a later start only traces. If the model cannot be compiled (a
custom model, no C++ compiler), decoding stays eager, with a warning.
"""

from __future__ import annotations

import logging
import os
import time
import types
from collections import Counter
from typing import TYPE_CHECKING

import torch

from chat_core.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from chat_core.worker.model_runner import LlamaModelInput, LlamaModelRunner

logger = logging.getLogger(__name__)


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "chat-core", "inductor")


class CompiledDecoder:
    def __init__(self, runner: LlamaModelRunner, kv_caches: list[torch.Tensor]) -> None:
        assert runner.model is not None
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
        self.runner = runner
        self.kv_caches = kv_caches
        model = runner.model

        def decode(input_ids, positions, kv_caches, slot_mapping, kind, tensors):  # type: ignore[no-untyped-def]
            # Only tensors (and the kind) go in: every length is a shape the graph keeps symbolic.
            return model(input_ids, positions, kv_caches, AttentionMetadata.of_kind(kind, slot_mapping, tensors))

        self.forward = torch.compile(_own_code(decode), fullgraph=True)
        self.failed = False
        self.warm_up_seconds = 0.0
        # Once every graph a decode step can need is compiled (`warm_up`), dynamo checks only the guards that
        # tell those graphs apart (kind, batch 1 or more), not the weights' hundreds: about 0.8 ms a step.
        self.warmed_up = False
        self.steps_by_kind: Counter[str] = Counter()  # compiled steps run, by attention kind

    def can_run(self, model_input: LlamaModelInput) -> bool:
        """A pure decode step (one new token per sequence), unless compiling has failed."""
        batch = model_input.seq_lens.shape[0]
        return not self.failed and batch > 0 and model_input.max_query_len == 1 and model_input.input_ids.shape[0] == batch

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor | None:
        """The step's final hidden states, or None if the model could not be compiled (run it eagerly)."""
        tensors = metadata.op_tensors()
        try:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=self.warmed_up):
                hidden = self.forward(input_ids, positions, self.kv_caches, metadata.slot_mapping, metadata.kind, tensors)
        except Exception as error:  # noqa: BLE001 - the eager path is correct; an error of the model itself recurs there
            self.failed = True
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            logger.warning("decode steps stay eager: torch.compile could not compile the model (%s)", reason)
            return None
        self.steps_by_kind[metadata.kind] += 1
        return hidden

    def warm_up(self) -> float:
        """Compile the graphs decode steps need before the first request: batch 1 (always padded attention:
        its padded view is its cache) and batch 2 (padded and blockwise; it serves every larger batch), on
        dummy tokens whose keys go to the scratch block. Seconds taken.
        Sizes are at least 2: the compiler specialises sizes of 1, which real steps would not match."""
        start = time.perf_counter()
        # No "duck sizing": two lengths that happen to be equal at compile time must not be assumed equal.
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            self._compile_graphs()
        self.warm_up_seconds = time.perf_counter() - start
        self.warmed_up = not self.failed
        if not self.failed:
            logger.info("compiled the CPU decode step in %.1f s (cache: %s)", self.warm_up_seconds, os.environ["TORCHINDUCTOR_CACHE_DIR"])
        return self.warm_up_seconds

    def _compile_graphs(self) -> None:
        runner = self.runner
        block_size, scratch = runner.block_size, runner.scratch_block
        device = runner.device
        for batch, kernel in ((1, "padded"), (2, "padded"), (2, "blockwise")):
            # Made as a step's inputs are (staged outside inference mode, the metadata built inside it): the
            # compiled graphs are guarded on that too.
            token_ids, positions = (torch.full((batch,), 2, dtype=torch.int64, device=device) for _ in range(2))
            seq_lens = torch.full((batch,), 3, dtype=torch.int64, device=device)
            block_tables = torch.full((batch, 1), scratch, dtype=torch.int64, device=device)
            slot_mapping = torch.full((batch,), scratch * block_size, dtype=torch.int64, device=device)
            query_start_loc = torch.arange(batch + 1, device=device)
            with torch.inference_mode():
                metadata = AttentionMetadata.build(
                    query_start_loc=query_start_loc,
                    seq_lens=seq_lens,
                    block_tables=block_tables,
                    slot_mapping=slot_mapping,
                    block_size=block_size,
                    max_query_len=1,
                    max_seq_len=3,
                    sliding_window=runner.model_config.sliding_window,
                    pad_slot=scratch * block_size,
                    decode_kernel=kernel,
                )
                for tensor in (token_ids, positions, metadata.slot_mapping, *metadata.op_tensors()):
                    _mark_dynamic(tensor)
                if self.run(token_ids, positions, metadata) is None:
                    break


def _mark_dynamic(tensor: torch.Tensor) -> None:
    """Compile every length of a step's input symbolically (batch, cached keys, blocks used), so one graph
    serves them all; the weights, which are not marked, stay static. Sizes of 0 and 1 are always special.
    Only the warm-up's inputs need it: once warm, steps run the graphs without compiling again."""
    for dim, size in enumerate(tensor.shape):
        if size > 1:
            torch._dynamo.mark_dynamic(tensor, dim)


def _own_code(function: types.FunctionType) -> types.FunctionType:
    """`function` with a code object of its own. Dynamo keeps compiled graphs per code object (at most 8):
    each engine's decoder gets its own, so engines in one process neither share nor exhaust them."""
    return types.FunctionType(
        function.__code__.replace(), function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )
