"""The recorded CPU decode step (`worker/native_decode.py`): one native call per step, the same bits as the
eager step, where it applies; eager decoding where it does not."""

from __future__ import annotations

import pytest
import torch

from chat_core import Engine, SamplingParams
from chat_core.layers import native_kernels
from decode_cases import PROMPTS, Recorder
from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(
    not native_kernels.available(), reason="the native kernels need an x86-64 CPU with AVX-512 and a C compiler"
)

MAX_TOKENS = (3, 17, 9, 24, 12)  # sequences join and leave the batch


def run(directory: str, **options):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    options = {"dtype": "float32", "block_size": 16, "max_num_seqs": 6, "model_runner_cls": Recorder, **options}
    with Engine.from_pretrained(directory, **options) as engine:
        outputs = engine.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        runner = engine.executor.worker.model_runner
        return [o.token_ids for o in outputs], runner.logits, runner.native_decode


def assert_same_bits(logits, expected_logits):
    assert logits.keys() == expected_logits.keys()
    for seq_id, rows in expected_logits.items():
        assert torch.equal(torch.stack(logits[seq_id]), torch.stack(rows)), seq_id


@pytest.mark.parametrize(
    "family, quantization",
    [("llama3", "int4"), ("qwen2", "int4"), ("llama_tied", "int4"), ("llama3", "int8"), ("llama", "int8")],
)
def test_recorded_decode_steps_give_the_eager_bits(tiny_checkpoints, family, quantization):
    """Every decode step replayed (batches of 1 to 5, sequences joining and leaving, biases, tied embeddings,
    int4 and int8) gives the eager step's logits bit for bit."""
    directory, _ = tiny_checkpoints(family)
    options = {"quantization": quantization, "quantization_group_size": 32}
    expected_tokens, expected_logits, none = run(directory, enforce_eager=True, **options)
    assert none is None
    tokens, logits, native = run(directory, **options)
    assert native is not None and native.steps > 0
    assert tokens == expected_tokens
    assert_same_bits(logits, expected_logits)


def test_recorded_decode_with_a_sliding_window_under_preemption_and_chunked_prefill(tmp_path):
    directory = str(tmp_path / "windowed")
    make_tiny_checkpoint(directory, "mistral", sliding_window=8, num_attention_heads=4)  # q, k, v: 128 outputs
    bytes_per_block = 4 * 16 * 2 * 16 * 2 * 4  # layers * block * (k,v) * head_dim * kv_heads * float32
    options = {"quantization": "int4", "quantization_group_size": 32, "kv_cache_memory_gib": 9 * bytes_per_block / 2**30}
    expected_tokens, expected_logits, _ = run(directory, enforce_eager=True, max_num_batched_tokens=16, **options)
    tokens, logits, native = run(directory, max_num_batched_tokens=16, **options)
    assert native is not None and native.steps > 0
    assert tokens == expected_tokens
    assert_same_bits(logits, expected_logits)


def test_models_without_native_products_decode_eagerly(tiny_checkpoints, caplog):
    directory, _ = tiny_checkpoints("llama3")
    with caplog.at_level("INFO", logger="chat_core.worker.native_decode"):
        _, _, native = run(directory)  # dense float32 weights: no native product
    assert native is None and "decode steps run eagerly" in caplog.text and "dense" in caplog.text
    for options in ({"compile_decode": True, "enforce_eager": True}, {"batch_invariant": True}, {"dtype": "bfloat16"}):
        _, _, native = run(directory, **{"quantization": "int4", "quantization_group_size": 32, **options})
        assert native is None, options
    # Outputs that are not whole blocks of 64 rows (tiny Mistral's q, k, v: 8 heads of 8, 96 outputs).
    directory, _ = tiny_checkpoints("mistral")
    caplog.clear()
    with caplog.at_level("INFO", logger="chat_core.worker.native_decode"):
        _, _, native = run(directory, quantization="int4", quantization_group_size=32)
    assert native is None and "not a multiple of 64" in caplog.text


def test_the_default_model_decodes_through_the_recorded_step(smollm2_path):
    with Engine.from_pretrained(smollm2_path) as engine:
        runner = engine.executor.worker.model_runner
        out = engine.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=12))
        assert runner.native_decode is not None and runner.native_decode.steps > 0
        assert "Paris" in out.text
