"""The decode attention kernels against the padded reference, and the bucketed (CUDA-graph) decode path.

The Triton kernel runs under Triton's CPU interpreter here (TRITON_INTERPRET=1, set before the kernel
module is imported): the same kernel code a GPU compiles, checked without one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from chat_core import Engine, SamplingParams  # noqa: E402
from chat_core.layers import native_ops  # noqa: E402
from chat_core.layers.attention import AttentionMetadata, BlockwiseDecodeMetadata, NativeDecodeMetadata, TritonDecodeMetadata  # noqa: E402
from chat_core.worker.compiled_decode import graphs_needed  # noqa: E402
from chat_core.worker.cuda_graphs import batch_buckets  # noqa: E402
from decode_cases import PROMPTS, Recorder  # noqa: E402
from native_marks import needs_native_kernels  # noqa: E402


@st.composite
def decode_batches(draw, block_sizes=(16, 32)):
    block_size = draw(st.sampled_from(block_sizes))
    num_kv_heads = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 3, 4]))
    head_dim = draw(st.sampled_from([16, 32, 64]))
    lens = draw(st.lists(st.integers(1, 5 * block_size), min_size=1, max_size=6))
    window = draw(st.one_of(st.none(), st.integers(1, 3 * block_size)))
    seed = draw(st.integers(0, 2**16))
    return block_size, num_kv_heads, group, head_dim, lens, window, seed


def make_case(block_size, num_kv_heads, group, head_dim, lens, seed):
    generator = torch.Generator().manual_seed(seed)
    widths = [-(-n // block_size) for n in lens]
    num_blocks = sum(widths) + 3
    # Every slot no sequence has written holds NaN: kernels must never let it into a result.
    key_cache = torch.full((num_blocks * block_size, num_kv_heads, head_dim), float("nan"))
    value_cache = torch.full_like(key_cache, float("nan"))
    order = torch.randperm(num_blocks, generator=generator)
    tables = torch.full((len(lens), max(widths)), int(order[-1]))  # padded with a block nobody owns
    used = 0
    for row, (n, width) in enumerate(zip(lens, widths)):
        tables[row, :width] = order[used : used + width]
        used += width
        slots = tables[row, torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
        key_cache[slots] = torch.randn(n, num_kv_heads, head_dim, generator=generator)
        value_cache[slots] = torch.randn(n, num_kv_heads, head_dim, generator=generator)
    # The reference (padded) path reads padding from one finite slot: give it one.
    pad_slot = int(order[-1]) * block_size
    key_cache[pad_slot] = 0.0
    value_cache[pad_slot] = 0.0
    q = torch.randn(len(lens), num_kv_heads * group, head_dim, generator=generator)
    return q, key_cache, value_cache, tables, pad_slot


def attend(kernel, q, key_cache, value_cache, tables, lens, block_size, window, pad_slot):
    device = q.device  # the metadata lives where the kernel reads it
    metadata = AttentionMetadata.build(
        query_start_loc=torch.arange(len(lens) + 1, device=device),
        seq_lens=torch.tensor(lens, device=device),
        block_tables=tables,
        slot_mapping=torch.zeros(len(lens), dtype=torch.int64, device=device),
        block_size=block_size,
        max_query_len=1,
        max_seq_len=max(lens),
        sliding_window=window,
        pad_slot=pad_slot,
        decode_kernel=kernel,
    )
    return metadata, metadata.attend(q, key_cache, value_cache, q.shape[-1] ** -0.5)


def check_against_padded(kernel, kind, case):
    """`kernel`'s output on the case against the padded reference's; its metadata, output and the case's tensors."""
    block_size, num_kv_heads, group, head_dim, lens, window, seed = case
    q, key_cache, value_cache, tables, pad_slot = make_case(block_size, num_kv_heads, group, head_dim, lens, seed)
    _, expected = attend("padded", q, key_cache, value_cache, tables, lens, block_size, window, pad_slot)
    metadata, out = attend(kernel, q, key_cache, value_cache, tables, lens, block_size, window, pad_slot)
    assert isinstance(metadata, kind)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    return metadata, out, (q, key_cache, value_cache, tables, pad_slot)


@settings(max_examples=40, deadline=None)
@given(decode_batches(block_sizes=(4, 8, 16)))
def test_blockwise_decode_matches_the_padded_reference(case):
    metadata, _, _ = check_against_padded("blockwise", BlockwiseDecodeMetadata, case)
    # It reads the blocks the sequences use and nothing else: work grows with the tokens cached.
    block_size, lens = case[0], case[4]
    assert metadata.blocks.numel() == sum(-(-n // block_size) for n in lens)


@needs_native_kernels
@settings(max_examples=60, deadline=None)
@given(decode_batches(block_sizes=(1, 4, 16)))
def test_native_decode_matches_the_padded_reference(case):
    block_size, num_kv_heads, _, head_dim, lens, window, seed = case
    metadata, out, (q, key_cache, value_cache, tables, pad_slot) = check_against_padded("native", NativeDecodeMetadata, case)
    # Each sequence's row is computed alone: the same bits when it is attended by itself.
    for row, n in enumerate(lens):
        _, alone = attend("native", q[row : row + 1], key_cache, value_cache, tables[row : row + 1], [n], block_size, window, pad_slot)
        assert torch.equal(alone[0], out[row])
    # Writing: the new token's key and value go to its slot first, and are attended.
    last = torch.tensor([tables[row, (n - 1) // block_size] * block_size + (n - 1) % block_size for row, n in enumerate(lens)])
    new_k, new_v = torch.randn(2, len(lens), num_kv_heads, head_dim, generator=torch.Generator().manual_seed(seed))
    kv_cache = torch.stack((key_cache, value_cache))
    out = dataclasses.replace(metadata, slot_mapping=last).write_and_attend(q, new_k, new_v, kv_cache, head_dim**-0.5)
    assert torch.equal(kv_cache[0][last], new_k) and torch.equal(kv_cache[1][last], new_v)
    _, expected = attend("padded", q, kv_cache[0], kv_cache[1], tables, lens, block_size, window, pad_slot)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@needs_native_kernels
@settings(max_examples=40, deadline=None)
@given(decode_batches(block_sizes=(1, 4, 16)))
def test_native_decode_reads_and_writes_a_bfloat16_cache(case):
    """A bfloat16 model's recorded step: new keys and values rounded to bfloat16 as torch rounds them, the cache
    widened exactly as read (the padded reference on the widened cache)."""
    block_size, num_kv_heads, _, head_dim, lens, window, seed = case
    q, key_cache, value_cache, tables, pad_slot = make_case(*case[:5], seed)
    key_cache, value_cache = key_cache.bfloat16(), value_cache.bfloat16()  # unwritten slots stay NaN
    last = torch.tensor([tables[row, (n - 1) // block_size] * block_size + (n - 1) % block_size for row, n in enumerate(lens)])
    new_k, new_v = torch.randn(2, len(lens), num_kv_heads, head_dim, generator=torch.Generator().manual_seed(seed)) * 3
    out = native_ops.decode_attention(
        q, new_k, new_v, key_cache, value_cache, last, tables, torch.tensor(lens), block_size, window, head_dim**-0.5
    )
    assert torch.equal(key_cache[last], new_k.bfloat16()) and torch.equal(value_cache[last], new_v.bfloat16())
    _, expected = attend("padded", q, key_cache.float(), value_cache.float(), tables, lens, block_size, window, pad_slot)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(decode_batches())
def test_triton_decode_matches_the_padded_reference(case):
    check_against_padded("triton", TritonDecodeMetadata, case)


CACHE_DTYPES = [
    ("padded", torch.bfloat16), ("padded", torch.float16),
    ("blockwise", torch.bfloat16), ("blockwise", torch.float16),
    ("triton", torch.bfloat16), ("triton", torch.float16),
    pytest.param("native", torch.bfloat16, marks=needs_native_kernels),
]  # fmt: skip


@pytest.mark.parametrize("kernel, cache_dtype", CACHE_DTYPES)
@settings(max_examples=12, deadline=None)
@given(case=decode_batches())
def test_decode_kernels_read_a_cache_of_another_dtype_than_their_queries(kernel, cache_dtype, case):
    """`kv_cache_dtype`: float32 queries against a bfloat16 or float16 cache, widened as read: the padded reference
    on the widened cache, to float32 rounding, and float32 out."""
    block_size, num_kv_heads, group, head_dim, lens, window, seed = case
    q, key_cache, value_cache, tables, pad_slot = make_case(block_size, num_kv_heads, group, head_dim, lens, seed)
    key_cache, value_cache = key_cache.to(cache_dtype), value_cache.to(cache_dtype)  # unwritten slots stay NaN
    _, expected = attend("padded", q, key_cache.float(), value_cache.float(), tables, lens, block_size, window, pad_slot)
    metadata = AttentionMetadata.build(
        query_start_loc=torch.arange(len(lens) + 1), seq_lens=torch.tensor(lens), block_tables=tables,
        slot_mapping=torch.zeros(len(lens), dtype=torch.int64), block_size=block_size, max_query_len=1,
        max_seq_len=max(lens), sliding_window=window, pad_slot=pad_slot, decode_kernel=kernel,
    )  # fmt: skip
    out = metadata.attend(q, key_cache, value_cache, head_dim**-0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.view(len(lens), -1), expected, atol=1e-5, rtol=1e-5)


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]


class BucketedRecorder(Recorder):
    """Decode steps through the CUDA-graph path's static buffers, padding and buckets, run eagerly on the
    CPU (no capture), with the Triton kernel under its interpreter."""

    @property
    def cuda_graphs_enabled(self) -> bool:
        return True


def run(directory: str, runner_cls, stats: dict | None = None, **options):
    """Tokens, logits and CUDA-graph decoder of PROMPTS answered together; `stats` gets the run's preemptions."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 17, 9, 24, 12)]  # join and leave
    with Engine.from_pretrained(directory, dtype="float32", block_size=16, max_num_seqs=6, model_runner_cls=runner_cls, **options) as engine:
        outputs = engine.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        runner = engine.executor.worker.model_runner
        graphs = runner.decode_graphs
        if stats is not None:
            stats["preemptions"] = engine.generator.scheduler.stats.preemptions
        return [o.token_ids for o in outputs], runner.logits, graphs


def preempting_cache_gib(kv_heads: int) -> float:
    """A KV cache of 6 blocks of 16 for a tiny model (4 layers, head_dim 16, float32): too small for PROMPTS
    answered together (they need 11 blocks at once), so sequences get preempted and recomputed."""
    return 6 * (4 * 16 * 2 * 16 * kv_heads * 4) / 2**30  # blocks * layers * block * (k,v) * head_dim * kv_heads * float32


@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2", "llama_tied"])
def test_bucketed_decode_gives_the_eager_tokens_and_logits(tiny_checkpoints, family):
    directory, _ = tiny_checkpoints(family)
    expected_tokens, expected_logits, none = run(directory, Recorder)
    assert none is None  # on CPU the default runner decodes eagerly
    tokens, logits, graphs = run(directory, BucketedRecorder)
    assert graphs is not None and graphs.buckets == [1, 2, 4, 6]
    assert tokens == expected_tokens
    for seq_id, rows in expected_logits.items():
        torch.testing.assert_close(torch.stack(logits[seq_id]), torch.stack(rows), atol=1e-4, rtol=0)


def test_bucketed_decode_with_a_bfloat16_cache_gives_the_eager_tokens_and_logits(tiny_checkpoints):
    """The CUDA-graph path's buffers and Triton kernel with `kv_cache_dtype="bfloat16"` beside float32 activations,
    against eager steps on the same cache dtype."""
    directory, _ = tiny_checkpoints("llama3")
    expected_tokens, expected_logits, _ = run(directory, Recorder, kv_cache_dtype="bfloat16", enforce_eager=True)
    tokens, logits, graphs = run(directory, BucketedRecorder, kv_cache_dtype="bfloat16")
    assert graphs is not None and tokens == expected_tokens
    for seq_id, rows in expected_logits.items():
        torch.testing.assert_close(torch.stack(logits[seq_id]), torch.stack(rows), atol=1e-4, rtol=0)


def test_bucketed_decode_under_preemption_and_chunked_prefill(tiny_checkpoints):
    directory, _ = tiny_checkpoints("llama")
    expected, _, _ = run(directory, Recorder)
    stats: dict = {}
    tokens, _, _ = run(directory, BucketedRecorder, stats, kv_cache_memory_gib=preempting_cache_gib(4), max_num_batched_tokens=16)
    assert tokens == expected and stats["preemptions"] > 0


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these)")


@needs_cuda
@settings(max_examples=25, deadline=None)
@given(decode_batches())
def test_triton_decode_on_a_gpu_matches_the_padded_reference(case):
    """The Triton kernel compiled for the GPU (where TRITON_INTERPRET=0) on CUDA tensors, against the CPU reference."""
    block_size, num_kv_heads, group, head_dim, lens, window, seed = case
    q, key_cache, value_cache, tables, pad_slot = make_case(block_size, num_kv_heads, group, head_dim, lens, seed)
    _, expected = attend("padded", q, key_cache, value_cache, tables, lens, block_size, window, pad_slot)
    cuda = [t.cuda() for t in (q, key_cache, value_cache, tables)]
    metadata, out = attend("triton", *cuda, lens, block_size, window, pad_slot)
    assert isinstance(metadata, TritonDecodeMetadata) and out.is_cuda
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


@needs_cuda
@pytest.mark.parametrize(
    "family, options",
    [
        ("llama", {}),
        ("mistral", {}),
        ("llama_tied", {}),
        ("qwen2", {}),
        ("llama3", {"kv_cache_memory_gib": preempting_cache_gib(2), "max_num_batched_tokens": 16}),  # preempts, chunks
        ("llama3", {"quantization": "int4"}),
        ("llama3", {"quantization": "int8"}),
        ("llama3", {"kv_cache_dtype": "bfloat16"}),
    ],
    ids=["llama", "mistral", "llama_tied", "qwen2", "llama3-preempted-chunked", "llama3-int4", "llama3-int8", "llama3-bf16-cache"],
)
def test_cuda_graph_decode_gives_the_eager_tokens_and_logits_on_a_gpu(tiny_checkpoints, family, options):
    directory, _ = tiny_checkpoints(family)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 17, 9, 24, 12)]  # join and leave
    results = {}
    for eager in (True, False):
        with Engine.from_pretrained(
            directory, device="cuda", dtype="float32", max_num_seqs=6, enforce_eager=eager, model_runner_cls=Recorder, **options
        ) as engine:
            outputs = engine.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
            runner = engine.executor.worker.model_runner
            assert (runner.decode_graphs is None) == eager
            results[eager] = ([o.token_ids for o in outputs], runner.logits)
            assert ("kv_cache_memory_gib" in options) == (engine.generator.scheduler.stats.preemptions > 0)
    assert results[True][0] == results[False][0]
    for seq_id, rows in results[True][1].items():
        torch.testing.assert_close(torch.stack(results[False][1][seq_id]), torch.stack(rows), atol=1e-4, rtol=0)


@needs_cuda
def test_device_cuda_without_an_index_and_the_cpu_give_the_same_tokens(tiny_checkpoints):
    directory, _ = tiny_checkpoints("llama")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    with Engine.from_pretrained(directory, device="cpu", dtype="float32") as cpu:
        expected = [o.token_ids for o in cpu.generate(prompts, params)]
    for quantization in (None, "int4", "int8"):
        with Engine.from_pretrained(directory, device="cuda", dtype="float32", quantization=quantization) as gpu:
            assert gpu.executor.worker.device.index is not None
            tokens = [o.token_ids for o in gpu.generate(prompts, params)]
            if quantization is None:
                assert tokens == expected
            else:
                assert all(len(t) == 16 for t in tokens)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (an engine on the second one)")
@pytest.mark.parametrize("eager", [True, False])
def test_an_engine_on_the_second_gpu_runs_its_steps_from_another_thread(tiny_checkpoints, eager):
    """`set_device` holds for the thread that loaded the engine only: steps from another thread (an AsyncEngine's
    loop, a thread pool) must still launch their kernels on the engine's GPU, not on cuda:0."""
    directory, _ = tiny_checkpoints("llama")
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with Engine.from_pretrained(directory, device="cuda:1", dtype="float32", enforce_eager=eager) as engine:
        expected = [o.token_ids for o in engine.generate(prompts, params)]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            outputs = pool.submit(engine.generate, prompts, params).result()
    assert [o.token_ids for o in outputs] == expected


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_compiled_cpu_decode_gives_the_eager_tokens_and_logits(tiny_checkpoints, family):
    """torch.compile'd decode steps (batch 1 and more, padded and blockwise attention, sequences joining and
    leaving) against eager ones, with preemption and chunked prefill in the compiled run."""
    directory, _ = tiny_checkpoints(family)
    expected_tokens, expected_logits, _ = run(directory, Recorder)
    with Engine.from_pretrained(
        directory, dtype="float32", block_size=16, max_num_seqs=6, model_runner_cls=Recorder, compile_decode=True
    ) as engine:
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 17, 9, 24, 12)]
        runner = engine.executor.worker.model_runner
        compiled = runner.compiled_decode
        assert compiled is not None and compiled.warmed_up and compiled.warm_up_seconds > 0
        compiled.steps_by_kind.clear()
        outputs = engine.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        assert [o.token_ids for o in outputs] == expected_tokens
        for seq_id, rows in expected_logits.items():
            torch.testing.assert_close(torch.stack(runner.logits[seq_id]), torch.stack(rows), atol=1e-4, rtol=0)
        # Every attention kind a decode step takes ran compiled, and every decode step did (none fell back to eager).
        assert all(compiled.steps_by_kind[kind] > 0 for _, kind in graphs_needed(torch.float32, torch.float32))
        assert not compiled.failed
        # One at a time: batch 1 replays the batch-1 graph.
        single = engine.generate([{"prompt_token_ids": PROMPTS[0]}], params[1])[0]
        assert single.token_ids[:3] == expected_tokens[0] and len(single.token_ids) == 17
    if family == "llama3":  # preemption and chunked prefill, compiled
        stats: dict = {}
        tokens, _, _ = run(
            directory, Recorder, stats, compile_decode=True, kv_cache_memory_gib=preempting_cache_gib(2), max_num_batched_tokens=16
        )
        assert tokens == expected_tokens and stats["preemptions"] > 0


def test_a_second_start_loads_the_compiled_decode_graphs_from_disk(tiny_checkpoints, tmp_path, monkeypatch, caplog):
    directory, _ = tiny_checkpoints("llama")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cold cache of this test's own
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 17, 9)]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:3]]

    def start(**options):
        with Engine.from_pretrained(directory, dtype="float32", max_num_seqs=4, **options) as engine:
            tokens = [o.token_ids for o in engine.generate(prompts, params)]
            return tokens, engine.executor.worker.model_runner.compiled_decode

    expected, _ = start()
    tokens, first = start(compile_decode=True)
    assert tokens == expected and first.graphs_loaded == 0 and not first.failed
    saved = sorted(os.listdir(first.artifact_dir))
    needed = len(graphs_needed(torch.float32, torch.float32))
    assert len(saved) == needed
    tokens, second = start(compile_decode=True)
    assert tokens == expected and second.graphs_loaded == needed and sum(second.steps_by_kind.values()) > 0
    # A damaged file is compiled again (and rewritten), with a warning; the answers stay the same.
    with open(os.path.join(first.artifact_dir, saved[0]), "wb") as file:
        file.write(b"not a compiled graph")
    with caplog.at_level("WARNING", logger="chat_core.worker.compiled_decode"):
        tokens, third = start(compile_decode=True)
    assert tokens == expected and third.graphs_loaded == needed - 1 and not third.failed
    assert "compiling the decode step again" in caplog.text
    _, fourth = start(compile_decode=True)
    assert fourth.graphs_loaded == needed
    # Another cache size is another graph (the cache's shape is static in it): compiled, not loaded.
    tokens, other = start(compile_decode=True, kv_cache_memory_gib=0.01)
    assert tokens == expected and other.graphs_loaded == 0


def test_enforce_eager_turns_compiled_decode_off(tiny_checkpoints):
    directory, _ = tiny_checkpoints("llama")
    with Engine.from_pretrained(directory, dtype="float32", compile_decode=True, enforce_eager=True) as engine:
        assert engine.executor.worker.model_runner.compiled_decode is None


def test_compiled_cpu_decode_of_int4_weights_gives_the_eager_tokens(tiny_checkpoints):
    directory, _ = tiny_checkpoints("llama3")
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 17, 9, 24, 12)]
    tokens = {}
    for compiled in (False, True):
        with Engine.from_pretrained(directory, dtype="float32", quantization="int4", max_num_seqs=6, compile_decode=compiled) as engine:
            tokens[compiled] = [o.token_ids for o in engine.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]
            decoder = engine.executor.worker.model_runner.compiled_decode
            assert (decoder is not None and sum(decoder.steps_by_kind.values()) > 0) == compiled
    assert tokens[True] == tokens[False]
