"""The real default model, SmolLM2-135M-Instruct (GGUF, Q4_1), against transformers reading the same file."""

from __future__ import annotations

import time

import pytest
import torch

from chat_core import Engine, SamplingParams
from chat_core.layers import native_kernels

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for staying focused while studying.",
]


def test_the_alias_loads_the_packaged_gguf_in_seconds():
    start = time.perf_counter()
    with Engine.from_pretrained("smollm2-135m-instruct") as engine:
        elapsed = time.perf_counter() - start
        config = engine.model_config
        assert (config.num_layers, config.num_heads, config.num_kv_heads, config.hidden_size) == (30, 9, 3, 576)
        assert config.tie_word_embeddings and engine.tokenizer.chat_template
    assert elapsed < 30, f"loading took {elapsed:.1f} s"  # transformers takes most of a minute; we take a few seconds


def test_greedy_chat_answers_equal_transformers(smollm2_engine, hf_smollm2):
    engine = smollm2_engine
    prompts = [engine.chat_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=48)
    outputs = engine.generate(prompts, params)
    for prompt, output in zip(prompts, outputs):
        ids = torch.tensor([prompt["prompt_token_ids"]])
        with torch.no_grad():
            reference = hf_smollm2.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=2, pad_token_id=2)
        expected = reference[0, ids.shape[1] :].tolist()
        if expected and expected[-1] == 2:
            assert output.finish_reason == "stop"
        assert output.token_ids == expected, (output.text, engine.tokenizer.decode(expected))
    assert "Paris" in outputs[0].text


def test_decode_logits_equal_transformers(smollm2_engine, hf_smollm2):
    """Every position's logits through our decode path: record them with a custom runner."""
    from chat_core import LlamaModelRunner

    class Recorder(LlamaModelRunner):
        logits: list[torch.Tensor] = []

        def process_logits(self, logits, model_input):
            Recorder.logits.append(logits.clone())
            return logits

    prompt = smollm2_engine.chat_prompt([{"role": "user", "content": QUESTIONS[2]}])["prompt_token_ids"]
    with Engine.from_pretrained("smollm2-135m-instruct", model_runner_cls=Recorder, quantization=None, dtype="float32") as engine:
        out = engine.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    with torch.no_grad():
        reference = hf_smollm2(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1]
    torch.testing.assert_close(torch.cat(Recorder.logits), reference.float(), atol=1e-4, rtol=0)


@pytest.mark.skipif(not native_kernels.available(), reason="exact quantized products at speed need the native CPU kernels")
def test_the_default_model_kept_quantized_answers_as_the_dequantized_one(smollm2_engine):
    """Q4_1 weights kept 4-bit and the Q8_0 table kept 8-bit, multiplied in float32: the same weights as the
    dequantized float32 engine, summed in another order, so the same greedy answers."""
    with Engine.from_pretrained("smollm2-135m-instruct") as engine:
        model = engine.executor.worker.model_runner.model
        assert model.lm_head.method.name == "q8_0" and model.layers[0].mlp.down_proj.method.name == "int4"
        prompts = [engine.chat_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
        params = SamplingParams(temperature=0, max_tokens=48)
        kept = engine.generate(prompts, params)
    dequantized = smollm2_engine.generate(prompts, params)
    assert [o.token_ids for o in kept] == [o.token_ids for o in dequantized]


@pytest.mark.parametrize(
    "options",
    [{}, {"quantization": None, "dtype": "bfloat16"}],
    ids=["default (Q4 kept packed, float32 activations)", "dequantized bfloat16"],
)
def test_default_and_reduced_precision_still_answer(options):
    with Engine.from_pretrained("smollm2-135m-instruct", **options) as engine:
        out = engine.chat([{"role": "user", "content": QUESTIONS[0]}], SamplingParams(temperature=0, max_tokens=16))
    assert "Paris" in out.text
