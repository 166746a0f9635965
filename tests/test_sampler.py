"""Properties of the sampler, through SamplingParams and the Sampler on random logits."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat_core import SamplingParams, ScheduledSequence
from chat_core.layers.sampler import Sampler, SamplingTensors

VOCAB = 50
settings.register_profile("sampler", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("sampler")


def rows_for(params_list, outputs=None, prompts=None):
    return [
        ScheduledSequence(
            seq_id=i,
            token_ids=[0],
            start_position=0,
            block_table=[0],
            sampling_params=p,
            do_sample=True,
            seed=p.seed,
            output_index=len(outputs[i]) if outputs else 0,
            prompt_token_ids=prompts[i] if prompts else ([] if p.uses_penalties else None),
            output_token_ids=outputs[i] if outputs else ([] if p.uses_penalties else None),
        )
        for i, p in enumerate(params_list)
    ]


def sample(logits, params_list, outputs=None, prompts=None):
    rows = rows_for(params_list, outputs, prompts)
    tensors = SamplingTensors.from_scheduled(rows, VOCAB, torch.device("cpu"))
    return Sampler()(logits, [r.seq_id for r in rows], tensors)


logits_strategy = st.integers(min_value=0, max_value=2**31 - 1).map(
    lambda seed: torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
)


@given(logits_strategy)
def test_greedy_is_argmax(logits):
    out = sample(logits, [SamplingParams(temperature=0)] * 4)
    assert out.sampled_token_ids.tolist() == logits.argmax(-1).tolist()


@given(logits_strategy, st.integers(1, 10), st.integers(0, 1000))
def test_top_k_only_picks_among_the_k_best(logits, k, seed):
    out = sample(logits, [SamplingParams(temperature=1.5, top_k=k, seed=seed + i) for i in range(4)])
    for row, token in enumerate(out.sampled_token_ids.tolist()):
        assert token in logits[row].topk(k).indices.tolist()


@given(logits_strategy, st.floats(0.05, 1.0), st.integers(0, 1000))
def test_top_p_picks_from_the_smallest_nucleus(logits, top_p, seed):
    out = sample(logits, [SamplingParams(temperature=1.0, top_p=top_p, seed=seed + i) for i in range(4)])
    for row, token in enumerate(out.sampled_token_ids.tolist()):
        probs = logits[row].softmax(-1)
        sorted_probs, order = probs.sort(descending=True)
        # The nucleus: the most likely tokens until their mass first reaches top_p.
        before = sorted_probs.cumsum(0) - sorted_probs
        nucleus = order[before < top_p - 1e-6].tolist()
        assert token in nucleus


@given(logits_strategy, st.floats(0.01, 1.0), st.integers(0, 1000))
def test_min_p_drops_tokens_below_the_threshold(logits, min_p, seed):
    out = sample(logits, [SamplingParams(temperature=1.0, min_p=min_p, seed=seed + i) for i in range(4)])
    for row, token in enumerate(out.sampled_token_ids.tolist()):
        probs = logits[row].softmax(-1)
        assert probs[token] >= min_p * probs.max() - 1e-6


@given(logits_strategy, st.integers(0, 2**40))
def test_a_seed_gives_the_same_token_whatever_else_is_in_the_batch(logits, seed):
    seeded = SamplingParams(temperature=1.0, seed=seed)
    alone = sample(logits[:1], [seeded])
    batched = sample(logits[[1, 0, 2]], [SamplingParams(temperature=1.0), seeded, SamplingParams(temperature=0.5, seed=3)])
    assert alone.sampled_token_ids[0] == batched.sampled_token_ids[1]


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0), float("-inf")] + [float("-inf")] * (VOCAB - 3)])
    counts = torch.zeros(VOCAB)
    for seed in range(2000):
        counts[sample(logits, [SamplingParams(temperature=1.0, seed=seed)]).sampled_token_ids[0]] += 1
    assert counts[2:].sum() == 0
    assert abs(counts[1] / 2000 - 0.75) < 0.04  # 3:1 odds, within ~4 standard deviations


@given(logits_strategy, st.integers(0, 5))
def test_logprobs_are_the_log_softmax_of_the_raw_logits(logits, k):
    out = sample(logits, [SamplingParams(temperature=0.7, seed=1, logprobs=k, top_k=3)] * 4)
    reference = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.sampled_logprobs, reference.gather(1, out.sampled_token_ids[:, None])[:, 0])
    if k:
        values, ids = reference.topk(k, -1)
        torch.testing.assert_close(out.top_logprobs, values)
        assert torch.equal(out.top_token_ids, ids)


@given(
    logits_strategy,
    st.floats(0.5, 2.0),
    st.floats(-2, 2),
    st.floats(-2, 2),
    st.lists(st.integers(0, VOCAB - 1), max_size=8),
    st.lists(st.integers(0, VOCAB - 1), max_size=8),
)
def test_penalties_follow_their_definitions(logits, repetition, presence, frequency, prompt, output):
    params = SamplingParams(temperature=0, repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency)
    got = sample(logits[:1], [params], outputs=[output], prompts=[prompt]).sampled_token_ids[0]
    expected = logits[0].clone()
    for token in set(prompt) | set(output):
        expected[token] = expected[token] / repetition if expected[token] > 0 else expected[token] * repetition
    for token in set(output):
        expected[token] -= frequency * output.count(token) + presence
    assert got == expected.argmax()


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 1.5),
        ("max_tokens", 0),
        ("n", 0),
        ("logprobs", 21),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("stop", [""]),
        ("seed", 1.5),
        ("temperature", float("nan")),
        # Values that would overflow the tensors they reach (found by tests/soak/fuzz_api.py).
        ("top_k", 2**63),
        ("seed", 2**64),
        ("stop_token_ids", [2**63]),
        ("repetition_penalty", float("inf")),
        ("repetition_penalty", 1e308),
        ("temperature", 10**400),
    ],
)
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        SamplingParams(**{field: value})
