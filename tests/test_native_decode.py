"""The recorded CPU decode step (`worker/native_decode.py`): one native call per step, the same bits as the
eager step, where it applies; eager decoding where it does not."""

from __future__ import annotations

import pytest
import torch

from chat_core import Engine, SamplingParams
from decode_cases import PROMPTS, Recorder
from gguf_writer import write_gguf
from native_marks import needs_native_kernels
from tiny_models import make_tiny_checkpoint

pytestmark = needs_native_kernels

MAX_TOKENS = (3, 17, 9, 24, 12)  # sequences join and leave the batch


def run(directory: str, stats: dict | None = None, **options):
    """Tokens, logits and recorded decoder of PROMPTS answered together; `stats` gets the run's preemptions."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    options = {"dtype": "float32", "block_size": 16, "max_num_seqs": 6, "model_runner_cls": Recorder, **options}
    with Engine.from_pretrained(directory, **options) as engine:
        outputs = engine.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        runner = engine.executor.worker.model_runner
        if stats is not None:
            stats["preemptions"] = engine.generator.scheduler.stats.preemptions
        return [o.token_ids for o in outputs], runner.logits, runner.native_decode


def assert_same_bits(logits, expected_logits):
    assert logits.keys() == expected_logits.keys()
    for seq_id, rows in expected_logits.items():
        assert torch.equal(torch.stack(logits[seq_id]), torch.stack(rows)), seq_id


@pytest.mark.parametrize(
    "family, quantization, kv_cache_dtype",
    [
        ("llama3", "int4", "auto"),
        ("qwen2", "int4", "auto"),
        ("llama_tied", "int4", "auto"),
        ("llama3", "int8", "auto"),
        ("llama", "int8", "auto"),
        ("llama3", "int4", "bfloat16"),
        ("qwen2", "int8", "bfloat16"),
    ],
)
def test_recorded_decode_steps_give_the_eager_bits(tiny_checkpoints, family, quantization, kv_cache_dtype):
    """Every decode step replayed (batches of 1 to 5, sequences joining and leaving, biases, tied embeddings,
    int4 and int8, a float32 or a bfloat16 KV cache beside float32 activations) gives the eager step's logits
    bit for bit."""
    directory, _ = tiny_checkpoints(family)
    options = {"quantization": quantization, "quantization_group_size": 32, "kv_cache_dtype": kv_cache_dtype}
    expected_tokens, expected_logits, none = run(directory, enforce_eager=True, **options)
    assert none is None
    tokens, logits, native = run(directory, **options)
    assert native is not None and native.steps > 0
    assert tokens == expected_tokens
    assert_same_bits(logits, expected_logits)


def mean_error_while_tokens_agree(runs, reference):
    """Mean over sampled rows of each run's largest logit error against `reference` (tokens, logits), over
    the steps where every run and the reference have sampled the same tokens so far (the same inputs)."""
    (ref_tokens, ref_logits), errors = reference, [[] for _ in runs]
    for index, seq_id in enumerate(sorted(ref_logits)):
        for step, ref_row in enumerate(ref_logits[seq_id]):
            if any(tokens[index][:step] != ref_tokens[index][:step] for tokens, _ in runs):
                break
            for error, (_, logits) in zip(errors, runs):
                error.append(float((logits[seq_id][step].float() - ref_row).abs().max()))
    assert all(len(error) >= 20 for error in errors), "too few comparable rows"
    return [sum(error) / len(error) for error in errors]


@pytest.mark.parametrize(
    "family, options",
    [
        ("llama3", {"quantization": None}),
        ("qwen2", {"quantization": None}),  # biases, widened once
        ("llama_tied", {"quantization": None}),  # the embedding read from the bfloat16 LM head's blocks
        ("llama3", {"quantization": "int4", "quantization_group_size": 32}),  # bfloat16 activations, int4 weights
    ],
)
def test_bfloat16_models_are_recorded_in_float32_and_land_closer_to_the_float32_model(tiny_checkpoints, family, options):
    """A bfloat16 model's recorded step keeps its residual stream and attention in float32 between bfloat16
    weights and KV cache: its logits are closer to the float32 model's than the eager bfloat16 step's are."""
    directory, _ = tiny_checkpoints(family)
    float32_tokens, float32_logits, _ = run(directory, **options)
    eager_tokens, eager_logits, none = run(directory, dtype="bfloat16", enforce_eager=True, **options)
    tokens, logits, native = run(directory, dtype="bfloat16", **options)
    assert none is None and native is not None and native.steps > 0 and native.dtype == torch.bfloat16
    assert all(len(t) == n for t, n in zip(tokens, MAX_TOKENS))
    recorded_error, eager_error = mean_error_while_tokens_agree(
        [(tokens, logits), (eager_tokens, eager_logits)], (float32_tokens, float32_logits)
    )
    scale = max(float(row.abs().max()) for rows in float32_logits.values() for row in rows)
    assert recorded_error < eager_error and recorded_error < 0.05 * scale, (recorded_error, eager_error, scale)


# GGUF files as llama.cpp's mixes store them (the base type, and the tensors it puts in another): Q4_K layers are
# int4 groups with float32 scales, Q5_K ones int8 groups with minima, Q6_K ones int8 groups of 16; a fused q/k/v
# of two kernels multiplies each part on its own and copies its columns into place. Where rows are too short for
# K-quant blocks (SmolLM2's), llama.cpp's Q4_K_M holds Q5_0 and Q8_0: int8 groups of 32, fused across the two.
GGUF_MIXES = {
    "Q4_K, Q6_K down and table": ("Q4_K", {"ffn_down.weight": "Q6_K", "token_embd.weight": "Q6_K"}),
    "Q4_K_M: Q6_K v in the fused q/k/v": ("Q4_K", {"attn_v.weight": "Q6_K", "ffn_down.weight": "Q6_K"}),
    "Q5_K_M": ("Q5_K", {"attn_v.weight": "Q6_K", "ffn_down.weight": "Q6_K"}),
    "Q4_K_M on short rows: Q5_0 and Q8_0": ("Q5_0", {"attn_v.weight": "Q8_0", "ffn_down.weight": "Q8_0", "token_embd.weight": "Q8_0"}),
}


@pytest.mark.parametrize("mix", list(GGUF_MIXES))
def test_gguf_mixes_decode_through_the_recorded_step_with_the_eager_bits(tmp_path, mix):
    """Every decode step replayed gives the eager step's logits bit for bit."""
    base, overrides = GGUF_MIXES[mix]
    model = make_tiny_checkpoint(str(tmp_path / "wide"), "llama_tied", vocab_size=384, hidden_size=256, intermediate_size=512)
    path = str(tmp_path / "mix.gguf")
    write_gguf(path, model, base, overrides=overrides)
    expected_tokens, expected_logits, none = run(path, enforce_eager=True)
    tokens, logits, native = run(path)
    assert none is None and native is not None and native.steps > 0
    assert tokens == expected_tokens
    assert_same_bits(logits, expected_logits)


def test_recorded_decode_with_a_sliding_window_under_preemption_and_chunked_prefill(tmp_path):
    directory = str(tmp_path / "windowed")
    make_tiny_checkpoint(directory, "mistral", sliding_window=8, num_attention_heads=4)  # q, k, v: 128 outputs
    bytes_per_block = 4 * 16 * 2 * 16 * 2 * 4  # layers * block * (k,v) * head_dim * kv_heads * float32
    # 6 blocks: PROMPTS answered together need 11 at once, so sequences are preempted and recomputed.
    options = {"quantization": "int4", "quantization_group_size": 32, "kv_cache_memory_gib": 6 * bytes_per_block / 2**30}
    expected_tokens, expected_logits, _ = run(directory, enforce_eager=True, max_num_batched_tokens=16, **options)
    stats: dict = {}
    tokens, logits, native = run(directory, stats, max_num_batched_tokens=16, **options)
    assert native is not None and native.steps > 0 and stats["preemptions"] > 0
    assert tokens == expected_tokens
    assert_same_bits(logits, expected_logits)


def test_models_without_native_products_decode_eagerly(tiny_checkpoints, caplog):
    directory, _ = tiny_checkpoints("llama3")
    with caplog.at_level("INFO", logger="chat_core.worker.native_decode"):
        _, _, native = run(directory)  # dense float32 weights: no native product
    assert native is None and "decode steps run eagerly" in caplog.text and "dense" in caplog.text
    for options in ({"compile_decode": True, "enforce_eager": True}, {"batch_invariant": True}):
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
