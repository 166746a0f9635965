"""CPU decode steps run through `torch.compile` (inductor): the CPU's counterpart of `cuda_graphs`.

An eager decode step on CPU is a thousand small ops (norms, casts, rotary, residual adds around each
layer's products), each paying the dispatcher's few microseconds. Compiled, the model's forward becomes one
call whose elementwise work is fused into a few C++ loops per layer; the quantized products and the
attention (`chat_core::cached_attention`, opaque to the compiler: its gathers change shape every step)
are called as they are (README: measured speed and start-up).

Only pure decode steps of a single-rank engine are compiled (prefills and mixed steps stay eager; a gloo
all-reduce or a pipeline hand-over would split the graph). Every length is symbolic, so a few graphs serve
all decode steps: batch 1 and batch 2 or more, for each attention kind a step can take (`graphs_needed`: the
native kind with a float32 cache where the native kernels are built, else padded or blockwise); `warm_up` makes
them at start-up. Each graph is compiled ahead of time (`aot_compile`: traced and compiled once, with no
guards: the decoder picks the graph itself) and saved, so a later start with the same model, settings,
torch and sources loads it from disk in about a second instead of tracing the model again. Saved graphs and
inductor's own cache live under `TORCHINDUCTOR_CACHE_DIR` (here `~/.cache/chat-core/inductor` unless set).
If the model cannot be compiled (a custom model, no C++ compiler), decoding stays eager, with a warning.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import platform
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from chat_core.layers import native_kernels
from chat_core.layers.attention import AttentionMetadata, cpu_decode_kernels

if TYPE_CHECKING:
    from chat_core.worker.model_runner import LlamaModelInput, LlamaModelRunner

logger = logging.getLogger(__name__)


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "chat-core", "inductor")


def graphs_needed(cache_dtype: torch.dtype, query_dtype: torch.dtype) -> list[tuple[int, str]]:
    """The graphs every decode step can need: (the batch size each is compiled at, its attention kind). The
    batch-1 graph serves batch 1 only (the compiler specialises sizes of 1), the batch-2 ones every larger batch."""
    return [(batch, kind) for kind in cpu_decode_kernels(cache_dtype, query_dtype) for batch in (1, 2) if (batch, kind) != (1, "blockwise")]


def _decode(model, input_ids, positions, kv_caches, slot_mapping, kind, tensors):  # type: ignore[no-untyped-def]
    # Only tensors (and the kind) go in: every length is a shape the graph keeps symbolic. The model is an
    # argument, not a closure, so that a saved graph can be loaded for another instance of the same model.
    return model(input_ids, positions, kv_caches, AttentionMetadata.of_kind(kind, slot_mapping, tensors))


class CompiledDecoder:
    def __init__(self, runner: LlamaModelRunner, kv_caches: list[torch.Tensor]) -> None:
        assert runner.model is not None
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
        self.runner = runner
        self.kv_caches = kv_caches
        self.graphs: dict[tuple[bool, str], Callable[..., torch.Tensor]] = {}  # (batch of 1, kind) -> graph
        self.failed = False
        self.warm_up_seconds = 0.0
        self.warmed_up = False
        self.graphs_loaded = 0  # of the graphs needed, read from disk by `warm_up` rather than compiled
        self.steps_by_kind: Counter[str] = Counter()  # compiled steps run, by attention kind

    @property
    def artifact_dir(self) -> str:
        return os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "chat-core-decode")

    def can_run(self, model_input: LlamaModelInput) -> bool:
        """A pure decode step (one new token per sequence), unless compiling has failed."""
        batch = model_input.seq_lens.shape[0]
        return not self.failed and batch > 0 and model_input.max_query_len == 1 and model_input.input_ids.shape[0] == batch

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor | None:
        """The step's final hidden states, or None where no graph serves it (run it eagerly)."""
        graph = self.graphs.get((input_ids.shape[0] == 1, metadata.kind))
        if graph is None:
            return None
        try:
            hidden = graph(self.runner.model, input_ids, positions, self.kv_caches, metadata.slot_mapping, metadata.kind, metadata.op_tensors())
        except Exception as error:  # noqa: BLE001 - the eager path is correct; an error of the model itself recurs there
            self._give_up(error)
            return None
        self.steps_by_kind[metadata.kind] += 1
        return hidden

    def warm_up(self) -> float:
        """Load or compile (and save) the graphs decode steps need, before the first request; each then runs
        once on dummy tokens whose keys go to the scratch block. Seconds taken."""
        start = time.perf_counter()
        try:
            key = _artifact_key(self.runner, self.kv_caches)
        except Exception as error:  # noqa: BLE001 - e.g. a torch without what the key reads: decode eagerly
            self._give_up(error)
            return 0.0
        compiling = False
        graphs = graphs_needed(self.runner.kv_cache_dtype, self.runner.dtype)
        for batch, kind in graphs:
            input_ids, positions, metadata = self._dummy_step(batch, kind)
            path = os.path.join(self.artifact_dir, f"{key}-b{batch}-{kind}.bin")
            graph = _load_graph(path)
            loaded = graph is not None
            if loaded:
                self.graphs_loaded += 1
            else:
                if not compiling:  # said once, as a warning: the CLI shows those, and the pause is long
                    logger.warning("compiling the decode step (a first start takes a minute or more; saved in %s)", self.artifact_dir)
                    compiling = True
                arguments = (self.runner.model, input_ids, positions, self.kv_caches, metadata.slot_mapping, kind, metadata.op_tensors())
                try:
                    graph = _compile_graph(arguments)
                except Exception as error:  # noqa: BLE001 - as in `run`
                    self._give_up(error)
                    break
                _save_graph(graph, path)
            self.graphs[(batch == 1, kind)] = graph
            with torch.inference_mode():
                if self.run(input_ids, positions, metadata) is None:
                    if loaded:  # a saved graph that does not run here: the next start compiles it again
                        os.remove(path)
                    break
        self.warm_up_seconds = time.perf_counter() - start
        self.warmed_up = not self.failed
        if not self.failed:
            logger.info(
                "compiled CPU decode ready in %.1f s (%d of %d graphs loaded from %s)",
                self.warm_up_seconds, self.graphs_loaded, len(graphs), self.artifact_dir,
            )
        return self.warm_up_seconds

    def _give_up(self, error: Exception) -> None:
        self.failed = True
        self.graphs.clear()
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        logger.warning("decode steps stay eager: torch.compile could not compile the model (%s)", reason)

    def _dummy_step(self, batch: int, kind: str) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """A decode step's inputs, made as a real step's are (staged outside inference mode, the metadata
        built inside it), with every length marked symbolic. Sizes are at least 2 where they may vary: the
        compiler specialises sizes of 1, which real steps would not match."""
        runner = self.runner
        block_size, scratch, device = runner.block_size, runner.scratch_block, runner.device
        token_ids, positions = (torch.full((batch,), 2, dtype=torch.int64, device=device) for _ in range(2))
        with torch.inference_mode():
            metadata = AttentionMetadata.build(
                query_start_loc=torch.arange(batch + 1, device=device),
                seq_lens=torch.full((batch,), 3, dtype=torch.int64, device=device),
                block_tables=torch.full((batch, 3), scratch, dtype=torch.int64, device=device),  # 3 keys of block size 1
                slot_mapping=torch.full((batch,), scratch * block_size, dtype=torch.int64, device=device),
                block_size=block_size,
                max_query_len=1,
                max_seq_len=3,
                sliding_window=runner.model_config.sliding_window,
                pad_slot=scratch * block_size,
                decode_kernel=kind,
            )
        for tensor in (token_ids, positions, metadata.slot_mapping, *metadata.op_tensors()):
            _mark_dynamic(tensor)
        return token_ids, positions, metadata


def _compile_graph(arguments: tuple) -> Any:
    """Trace and compile `_decode` for these arguments, with no guards (the decoder picks graphs by itself)."""
    compiler = torch.compile(_decode, fullgraph=True, options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
    # No "duck sizing": two lengths that happen to be equal at compile time must not be assumed equal.
    with torch.fx.experimental._config.patch(use_duck_shape=False), torch.inference_mode():
        return compiler.aot_compile((arguments, {}))


def _save_graph(graph: Any, path: str) -> None:
    """Save for later starts; a cache that cannot be written costs those starts a compile, nothing else."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        graph.save_compiled_function(path)
    except Exception as error:  # noqa: BLE001 - e.g. a read-only cache, or a graph that cannot be serialised
        logger.warning("the compiled decode step could not be saved to %s (%s): later starts compile again", path, error)


def _load_graph(path: str) -> Callable[..., torch.Tensor] | None:
    """A graph saved by an earlier start, or None (none saved, or unreadable: it is compiled again)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as file:
            graph = torch.compiler.load_compiled_function(file)
    except Exception as error:  # noqa: BLE001 - a stale or damaged file is compiled again and overwritten
        logger.warning("compiling the decode step again: could not load %s (%s)", path, str(error).strip()[:200])
        return None
    graph.disable_guard_check()
    return graph


def _artifact_key(runner: LlamaModelRunner, kv_caches: list[torch.Tensor]) -> str:
    """What a saved graph depends on: torch, this package's sources, the CPU, the model's structure (its
    modules and their weights' names, shapes and dtypes, not their values: weights are graph inputs), the
    KV cache's shape (static in the graph) and the engine settings that shape the step. A graph saved under
    another key is never loaded."""
    assert runner.model is not None
    digest = hashlib.sha256()
    config = runner.engine_config
    for part in (
        torch.__version__,
        platform.machine(),
        torch.backends.cpu.get_cpu_capability(),
        _source_digest(),
        repr(runner.model_config),
        repr(runner.model),
        (str(runner.dtype), config.quantization, config.quantization_group_size, config.quantization_compute_dtype),
        native_kernels.available(),  # which kernels "auto" picked
        runner.block_size,
        [(tuple(cache.shape), cache.dtype) for cache in kv_caches],
    ):
        digest.update(repr(part).encode())
    tensors = itertools.chain(runner.model.named_parameters(remove_duplicate=False), runner.model.named_buffers(remove_duplicate=False))
    for name, tensor in tensors:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{tensor.layout}".encode())
    return digest.hexdigest()[:24]


@functools.cache
def _source_digest() -> str:
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for directory, _, files in sorted(os.walk(package)):
        for name in sorted(f for f in files if f.endswith((".py", ".c"))):
            with open(os.path.join(directory, name), "rb") as file:
                digest.update(name.encode() + file.read())
    return digest.hexdigest()


def _mark_dynamic(tensor: torch.Tensor) -> None:
    """Compile every length of a step's input symbolically (batch, cached keys, blocks used), so one graph
    serves them all; the weights, which are not marked, stay static. Sizes of 0 and 1 are always special.
    Only the warm-up's inputs need it: once warm, steps run the graphs without compiling again."""
    for dim, size in enumerate(tensor.shape):
        if size > 1:
            torch._dynamo.mark_dynamic(tensor, dim)
