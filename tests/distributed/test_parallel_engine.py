"""Tensor, pipeline and combined parallel generation with real processes (gloo): identical to one process."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import torch
from gguf_writer import write_gguf
from tiny_models import make_tiny_checkpoint

from chat_core import Engine, SamplingParams

PROMPTS = [{"prompt_token_ids": p} for p in ([5, 17, 33, 9, 100, 200, 64], [3, 4], list(range(40, 90)))]
# Greedy, with the top-5 log-probs of every step: those carry the logits (up to a constant).
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
SEEDED = SamplingParams(temperature=1.0, top_k=20, seed=7, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def mistral_dir(tiny_checkpoints):
    return tiny_checkpoints("mistral")[0]  # 8 heads, 2 kv heads, 4 layers


@pytest.fixture(scope="module")
def reference(mistral_dir):
    with Engine.from_pretrained(mistral_dir, block_size=4) as engine:
        return engine.generate(PROMPTS, PARAMS), engine.generate(PROMPTS, SEEDED)


def assert_same_generation(outputs, expected, tolerance: float = 1e-5):
    """The same tokens and top-5 candidates, log-probs within `tolerance` (float32 sums split over ranks)."""
    for ours, theirs in zip(outputs, expected):
        assert ours.token_ids == theirs.token_ids
        for a, b in zip(ours.outputs[0].top_logprobs or [], theirs.outputs[0].top_logprobs or []):
            assert [x.token_id for x in a] == [x.token_id for x in b]
            assert [x.logprob for x in a] == pytest.approx([x.logprob for x in b], abs=tolerance)




@pytest.mark.parametrize(
    "tp,pp,control_plane",
    [(2, 1, "broadcast"), (2, 1, "spmd"), (1, 2, "broadcast"), (1, 2, "spmd"), (2, 2, "broadcast"), (2, 2, "spmd")],
)
def test_parallel_generation_equals_one_process(mistral_dir, reference, tp, pp, control_plane, left_behind):
    greedy, seeded = reference
    with Engine.from_pretrained(
        mistral_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp, control_plane=control_plane, block_size=4
    ) as engine:
        assert_same_generation(engine.generate(PROMPTS, PARAMS), greedy)
        assert [o.token_ids for o in engine.generate(PROMPTS, SEEDED)] == [o.token_ids for o in seeded]
        # Sequences joining and leaving the batch: different lengths end at different steps.
        mixed = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (2, 12, 5)]
        for out, exp, p in zip(engine.generate(PROMPTS, mixed), greedy, mixed):
            assert out.token_ids == exp.token_ids[: p.max_tokens]
    assert not left_behind(), "shutdown() must leave no process behind"


@pytest.mark.parametrize("control_plane", ["broadcast", "spmd"])
def test_steps_split_for_attention_under_tensor_and_pipeline_parallel(mistral_dir, control_plane, left_behind):
    """A long prompt prefilled in chunks beside six decodes: steps whose attention splits in parts (decided on
    the host lengths that travel with the step, or that each rank works out), as in one process."""
    short = ([5, 17, 33], [3, 4], [7] * 5, [11, 12, 13, 14], [9, 8], [21, 22, 23])
    prompts = [{"prompt_token_ids": p} for p in (*short, list(range(40, 140)))]
    options = dict(block_size=4, max_num_batched_tokens=24, enable_prefix_caching=False)
    with Engine.from_pretrained(mistral_dir, **options) as engine:
        expected = engine.generate(prompts, PARAMS)
    with Engine.from_pretrained(mistral_dir, tensor_parallel_size=2, pipeline_parallel_size=2, control_plane=control_plane, **options) as engine:
        assert_same_generation(engine.generate(prompts, PARAMS), expected)
    assert not left_behind(), "shutdown() must leave no process behind"


def test_uneven_layer_split(mistral_dir, reference):
    with Engine.from_pretrained(mistral_dir, pipeline_parallel_size=2, layers_per_stage=(1, 3), block_size=4) as engine:
        assert_same_generation(engine.generate(PROMPTS, PARAMS), reference[0])


# Quantized under tensor parallel, each rank repacks only its slice of the Q4 groups. Multiplied exactly
# (float32 kernels) the split changes nothing but the order of float32 sums, like dense weights. With the
# default bfloat16 kernels, each rank's partial sum of a row-parallel layer is rounded to bfloat16 before
# the all-reduce, which can flip a near-tie: that layout is compared on pipeline stages only.
LAYOUTS = {
    "dequantized float32": ({"quantization": None, "dtype": "float32"}, [(3, 1), (1, 2)]),
    "Q4 kept packed, exact kernels": ({"quantization": "gguf", "quantization_compute_dtype": "float32"}, [(3, 1)]),
    "default: Q4 kept packed": ({}, [(1, 2)]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_smollm2_tensor_parallel_3_and_pipeline_2_answer_like_one_process(smollm2_engine, smollm2_path, layout, left_behind):
    weights, splits = LAYOUTS[layout]
    questions = ["What is the capital of France?", "Name a primary colour."]
    prompts = [smollm2_engine.chat_prompt([{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(temperature=0, max_tokens=16)
    with Engine.from_pretrained(smollm2_path, **weights) as single:
        expected = [o.token_ids for o in single.generate(prompts, params)]
    for tp, pp in splits:
        with Engine.from_pretrained(smollm2_path, tensor_parallel_size=tp, pipeline_parallel_size=pp, **weights) as engine:
            assert [o.token_ids for o in engine.generate(prompts, params)] == expected
    assert not left_behind()


def test_a_bfloat16_kv_cache_answers_like_one_process(mistral_dir, left_behind):
    """`kv_cache_dtype="bfloat16"`: each rank caches its heads' keys and values (or its layers') in bfloat16."""
    options = {"kv_cache_dtype": "bfloat16", "block_size": 4}
    with Engine.from_pretrained(mistral_dir, **options) as single:
        expected = single.generate(PROMPTS, PARAMS)
    for tp, pp in [(2, 1), (1, 2)]:
        with Engine.from_pretrained(mistral_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp, **options) as engine:
            assert {c.dtype for c in engine.executor.driver.kv_cache} == {torch.bfloat16}
            assert_same_generation(engine.generate(PROMPTS, PARAMS), expected)
    assert not left_behind()


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_a_checkpoint_quantized_as_read_answers_like_one_process(tmp_path, quantization, left_behind):
    """`quantization="int8"/"int4"` on a Hugging Face checkpoint: each rank quantizes only its slice, rounded as
    the whole tensor would be (int8 scales by whole rows; int4 groups of 32 inside each rank's inputs, 128 = 2 x 64
    for down_proj). Exact kernels: the tokens of one process, log-probs within 1e-4."""
    path = str(tmp_path / "tiny-llama")
    make_tiny_checkpoint(path, "llama", intermediate_size=128)
    options = {"quantization": quantization, "quantization_group_size": 32, "quantization_compute_dtype": "float32", "block_size": 4}
    if quantization == "int8":
        del options["quantization_group_size"]
    with Engine.from_pretrained(path, **options) as single:
        expected = single.generate(PROMPTS, PARAMS)
    for tp, pp in [(2, 1), (1, 2)]:
        with Engine.from_pretrained(path, tensor_parallel_size=tp, pipeline_parallel_size=pp, **options) as engine:
            assert_same_generation(engine.generate(PROMPTS, PARAMS), expected, tolerance=1e-4)
    assert not left_behind()


@pytest.mark.parametrize("o_proj", ["Q4_K", "Q5_K", "Q6_K"])
def test_a_k_quant_gguf_split_inside_its_blocks_answers_like_one_process(tmp_path, o_proj, left_behind):
    """K-quants store blocks of 256 inputs; under tp=2 the row-parallel o_proj gives each rank 128 of them (groups
    of 32 or 16, minima too, read from inside the blocks), down_proj 256. Exact kernels: the same answers as one process
    (log-probs within 1e-4: sums over 256-512 inputs, split in two)."""
    model = make_tiny_checkpoint(str(tmp_path / "wide"), "llama_tied", hidden_size=256, intermediate_size=512)
    path = str(tmp_path / "wide-k-quants.gguf")
    write_gguf(path, model, "Q4_K", overrides={"attn_output.weight": o_proj, "attn_v.weight": "Q6_K"})
    options = {"quantization_compute_dtype": "float32", "block_size": 4}
    with Engine.from_pretrained(path, **options) as single:
        expected = single.generate(PROMPTS, PARAMS)
    with Engine.from_pretrained(path, tensor_parallel_size=2, **options) as engine:
        assert_same_generation(engine.generate(PROMPTS, PARAMS), expected, tolerance=1e-4)
    assert not left_behind()


def test_batch_invariance_holds_under_tensor_parallel(smollm2_path, left_behind):
    # Each rank's products and attention are row-invariant, and the all-reduce adds the ranks' partial sums
    # in an order that does not depend on the batch: a request batched answers as alone, logprobs included.
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "What is 17 times 23?", "Name a primary colour."]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=0)
    with Engine.from_pretrained(smollm2_path, tensor_parallel_size=3, batch_invariant=True, max_num_batched_tokens=48) as engine:
        prompts = [engine.chat_prompt([{"role": "user", "content": q}]) for q in questions]
        batched = engine.generate(prompts, params)
        alone = [engine.generate([prompt], params)[0] for prompt in prompts]
    for b, a in zip(batched, alone):
        assert b.token_ids == a.token_ids
        assert [p.logprob for p in b.outputs[0].logprobs] == [p.logprob for p in a.outputs[0].logprobs]
    assert not left_behind()


def test_a_killed_worker_is_reported_by_rank_and_nothing_hangs(mistral_dir, left_behind):
    from chat_distributed import WorkerFailedError

    engine = Engine.from_pretrained(mistral_dir, tensor_parallel_size=2, block_size=4, distributed_timeout_s=30)
    try:
        worker = engine.executor.processes.processes[1]
        stream = engine.stream(PROMPTS[2], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
        next(stream)
        os.kill(worker.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerFailedError, match="rank 1"):
            for _ in stream:
                pass
        assert time.monotonic() - start < 30
        with pytest.raises(WorkerFailedError, match="rank 1"):  # the engine stays failed, it does not hang
            engine.generate(PROMPTS[:1], PARAMS)
    finally:
        engine.shutdown()
    assert not left_behind()


def test_a_failed_start_leaves_no_process(tmp_path, mistral_dir, left_behind):
    from chat_distributed import WorkerFailedError

    # int4 groups of 32 cannot be split across an MLP of 160 over 2 ranks: every rank fails while building its
    # model. (A tensor-parallel size the heads do not split into is refused before any rank starts.)
    with pytest.raises(WorkerFailedError, match="cut groups in two"):
        Engine.from_pretrained(mistral_dir, tensor_parallel_size=2, quantization="int4", quantization_group_size=32, distributed_timeout_s=20)
    assert not left_behind()


def test_fewer_kv_heads_than_ranks_are_replicated(tmp_path):
    from tiny_models import make_tiny_checkpoint

    make_tiny_checkpoint(str(tmp_path), "llama", num_key_value_heads=1)
    with Engine.from_pretrained(str(tmp_path)) as engine:
        expected = engine.generate(PROMPTS, PARAMS)
    with Engine.from_pretrained(str(tmp_path), tensor_parallel_size=2) as engine:
        assert_same_generation(engine.generate(PROMPTS, PARAMS), expected)


def test_leaving_the_interpreter_without_shutdown_stops_every_rank(tmp_path, mistral_dir):
    import subprocess
    import sys

    script = (
        "from chat_core import Engine\n"
        f"engine = Engine.from_pretrained({mistral_dir!r}, tensor_parallel_size=2)\n"
        "print(engine.executor.processes.processes[1].pid, flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout.split()[-1])
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
