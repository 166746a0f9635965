"""The engine's behaviour through its public interface: batching, sampling, stopping, streaming."""

from __future__ import annotations

import pytest

from chat_core import Engine, PromptTooLongError, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = [list(range(5, 12)), [3, 4], list(range(40, 90)), [100, 7, 100, 7, 100]]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    directory, _ = tiny_checkpoints("llama")
    with Engine.from_pretrained(directory, block_size=4) as engine:
        yield engine


def ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def test_a_greedy_batch_gives_each_prompt_its_own_tokens(tiny):
    batched = tiny.generate(ids(PROMPTS), GREEDY)
    alone = [tiny.generate(ids([p]), GREEDY)[0] for p in PROMPTS]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    assert all(o.finish_reason == "length" and len(o.token_ids) == 24 for o in batched)
    assert [o.num_prompt_tokens for o in batched] == [len(p) for p in PROMPTS]


def test_sequences_join_and_leave_the_running_batch(tiny):
    # Different max_tokens make sequences leave at different steps; later ones join mid-way.
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 17, 9, 24)]
    outputs = tiny.generate(ids(PROMPTS), params)
    for prompt, param, output in zip(PROMPTS, params, outputs):
        assert output.token_ids == tiny.generate(ids([prompt]), GREEDY)[0].token_ids[: param.max_tokens]


def test_small_cache_and_small_token_budget_preempt_and_chunk_without_changing_tokens(tiny_checkpoints):
    directory, _ = tiny_checkpoints("llama")
    expected = None
    with Engine.from_pretrained(directory, block_size=4) as roomy:
        expected = [o.token_ids for o in roomy.generate(ids(PROMPTS), GREEDY)]
    # 25 blocks of 4 slots cannot hold all four sequences at once: some are preempted and recomputed.
    bytes_per_block = 4 * 4 * 2 * 16 * 4 * 4  # layers * block * (k,v) * head_dim * kv_heads * float32
    with Engine.from_pretrained(
        directory, block_size=4, kv_cache_memory_gib=25 * bytes_per_block / 2**30, max_num_batched_tokens=16
    ) as tight:
        outputs = tight.generate(ids(PROMPTS), GREEDY)
        assert tight.generator.scheduler.stats.preemptions > 0
    assert [o.token_ids for o in outputs] == expected


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    first = tiny.generate(ids(PROMPTS), params)
    again = tiny.generate(ids(PROMPTS[::-1]), params)[::-1]
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    other = tiny.generate(ids(PROMPTS), SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True))
    assert [o.token_ids for o in other] != [o.token_ids for o in first]


def test_n_completions_of_one_request_are_sampled_independently(tiny):
    out = tiny.generate(ids(PROMPTS[:1]), SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    assert out.num_completion_tokens == 36


def test_stop_token_ids_and_max_tokens(tiny):
    full = tiny.generate(ids(PROMPTS[:1]), GREEDY)[0].token_ids
    stop_at = full[5]
    out = tiny.generate(ids(PROMPTS[:1]), SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_at], ignore_eos=True))[0]
    assert out.token_ids == full[: full.index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    assert len(tiny.generate(ids(PROMPTS[:1]), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].token_ids) == 3


def test_logprobs_match_a_reference_log_softmax(tiny_checkpoints):
    import torch

    directory, hf_model = tiny_checkpoints("llama")
    prompt = PROMPTS[0]
    with Engine.from_pretrained(directory) as engine:
        out = engine.generate(ids([prompt]), SamplingParams(temperature=0.8, seed=3, max_tokens=6, logprobs=4, ignore_eos=True))[0]
    completion = out.outputs[0]
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + completion.token_ids])).logits[0, len(prompt) - 1 : -1]
    reference = torch.log_softmax(logits.float(), -1)
    for step, token in enumerate(completion.token_ids):
        assert completion.logprobs[step].token_id == token
        assert completion.logprobs[step].logprob == pytest.approx(float(reference[step, token]), abs=1e-4)
        top_values, top_ids = reference[step].topk(4)
        assert [lp.token_id for lp in completion.top_logprobs[step]] == top_ids.tolist()
        assert [lp.logprob for lp in completion.top_logprobs[step]] == pytest.approx(top_values.tolist(), abs=1e-4)


def test_text_stop_strings_are_never_shown(smollm2_engine):
    engine = smollm2_engine
    prompt = engine.chat_prompt([{"role": "user", "content": "List the days of the week, one per line."}])
    full = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=40))[0].text
    assert "Tuesday" in full, full
    out = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop=["Tuesday", "Friday"]))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == "Tuesday"
    assert out.text == full[: full.index("Tuesday")]
    streamed = "".join(d.text for d in engine.stream(prompt, SamplingParams(temperature=0, max_tokens=40, stop=["Tuesday"])))
    assert streamed == out.text


def test_stream_yields_the_same_text_as_generate(smollm2_engine):
    params = SamplingParams(temperature=0.7, seed=11, max_tokens=30)
    deltas = list(smollm2_engine.stream("The ocean is", params))
    assert deltas[-1].finish_reason in ("stop", "length")
    assert "".join(d.text for d in deltas) == smollm2_engine.generate("The ocean is", params)[0].text
    assert not any("\ufffd" in d.text for d in deltas)


def test_a_prompt_longer_than_the_context_is_refused_clearly(tiny_checkpoints):
    directory, _ = tiny_checkpoints("llama")
    with Engine.from_pretrained(directory, max_model_len=32) as engine:
        with pytest.raises(PromptTooLongError, match="40 tokens.*32"):
            engine.generate(ids([list(range(40))]), GREEDY)
        # Generation stops at the context's end rather than running past it.
        out = engine.generate(ids([list(range(20))]), SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
        assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_bad_prompts_are_refused_clearly(tiny):
    with pytest.raises(ValueError, match="no tokenizer"):
        tiny.generate("text needs a tokenizer", GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.generate(ids([[1, 2, 10_000]]), GREEDY)
    with pytest.raises(ValueError, match="empty"):
        tiny.generate(ids([[5, 6], []]), GREEDY)  # the first prompt was fine: it must not stay queued
    assert not tiny.generator.has_unfinished_requests()  # nothing was left behind


def test_abandoning_a_stream_frees_its_sequence(tiny):
    stream = tiny.stream(ids(PROMPTS[:1])[0], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    next(stream)
    stream.close()
    assert not tiny.generator.has_unfinished_requests()
    assert tiny.generator.block_manager.num_free_blocks == tiny.generator.block_manager.num_blocks
