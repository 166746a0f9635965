"""`batch_invariant=True`: a request's tokens and logits are bit for bit those it gets alone, whatever else
the step holds (other sequences, their lengths, prefills beside decodes, how its prompt was chunked).

Checked at two levels: the attention of one token against the same token in other steps (hypothesis), and
whole engines, batched against alone, on the default quantized SmolLM2 and on dense tiny models.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chat_core import Engine, SamplingParams
from chat_core.layers.attention import AttentionMetadata, BatchInvariantAttentionMetadata
from test_paged_attention import make_case


@st.composite
def steps(draw):
    """A target sequence (cached tokens + new query tokens) and other sequences that may share its step."""
    block_size = draw(st.sampled_from([4, 16]))
    num_kv_heads = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 3]))
    head_dim = draw(st.sampled_from([16, 64]))
    cached = draw(st.integers(0, 150))
    new = draw(st.integers(1, 40))
    others = draw(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 30)), max_size=5))  # (cached, new)
    position = draw(st.integers(0, len(others)))
    window = draw(st.one_of(st.none(), st.integers(1, 100)))
    seed = draw(st.integers(0, 2**16))
    return block_size, num_kv_heads, group, head_dim, cached, new, others, position, window, seed


class Cache:
    """A paged cache of random keys/values for sequences of the given lengths (`make_case`'s: NaN in every
    slot no sequence wrote, one finite padding slot)."""

    def __init__(self, lens, block_size, num_kv_heads, head_dim, seed):
        _, self.keys, self.values, self.tables, self.pad_slot = make_case(block_size, num_kv_heads, 1, head_dim, lens, seed)
        self.block_size = block_size

    def attend(self, step, window, batch_invariant=True):
        """`step`: (sequence, seq_len after the step, queries [n, heads, dim]) per sequence -> outputs per sequence."""
        query_lens = [q.shape[0] for _, _, q in step]
        seq_lens = [n for _, n, _ in step]
        tables = self.tables[[s for s, _, _ in step]]  # rows padded with a block nobody owns
        metadata = AttentionMetadata.build(
            query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()]),
            seq_lens=torch.tensor(seq_lens),
            block_tables=tables,
            slot_mapping=torch.zeros(sum(query_lens), dtype=torch.int64),
            block_size=self.block_size,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            sliding_window=window,
            pad_slot=self.pad_slot,
            decode_kernel="padded",
            batch_invariant=batch_invariant,
        )
        assert isinstance(metadata, BatchInvariantAttentionMetadata) == batch_invariant
        queries = torch.cat([q for _, _, q in step])
        out = metadata.attend(queries, self.keys, self.values, queries.shape[-1] ** -0.5)
        return out.split(query_lens)


@settings(max_examples=60, deadline=None)
@given(steps())
def test_a_token_gets_the_same_attention_bits_in_any_step(case):
    block_size, num_kv_heads, group, head_dim, cached, new, others, position, window, seed = case
    lens = [cached + new] + [c + n for c, n in others]
    cache = Cache(lens, block_size, num_kv_heads, head_dim, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    heads = num_kv_heads * group

    def queries(n):
        return torch.randn(n, heads, head_dim, generator=generator)

    target_queries = queries(new)
    step = [(1 + i, c + n, queries(n)) for i, (c, n) in enumerate(others)]
    step.insert(position, (0, cached + new, target_queries))
    in_batch = cache.attend(step, window)[position]

    alone = cache.attend([(0, cached + new, target_queries)], window)[0]
    assert torch.equal(in_batch, alone)
    # Each token as the only query of its step (a decode, or a one-token chunk of a prefill).
    for i in range(new):
        one = cache.attend([(0, cached + i + 1, target_queries[i : i + 1])], window)[0]
        assert torch.equal(in_batch[i : i + 1], one), f"token {i} of {new}"
    # The same numbers as the reference attention.
    reference = cache.attend(step, window, batch_invariant=False)[position]
    torch.testing.assert_close(in_batch, reference, atol=1e-5, rtol=1e-5)


QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion in one paragraph.",
    "List three prime numbers and explain why they are prime.",
    "Who wrote Hamlet? Answer briefly.",
    "Translate 'good morning' into Spanish, French and German.",
    "What is 17 times 23?",
    "Describe a cat to someone who has never seen one, in detail, with many words.",
]


def batched_and_alone(engine, prompts, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0)
    batched = engine.generate(prompts, params)
    alone = [engine.generate([prompt], params)[0] for prompt in prompts]
    return batched, alone


def assert_same_answers(batched, alone):
    for index, (b, a) in enumerate(zip(batched, alone)):
        assert b.token_ids == a.token_ids, f"prompt {index}"
        # logprobs are rounded from the logits: equal floats means equal logits, near enough to bitwise.
        assert [p.logprob for p in b.outputs[0].logprobs] == [p.logprob for p in a.outputs[0].logprobs], f"prompt {index}"


def test_default_model_answers_in_a_batch_exactly_as_alone(smollm2_path):
    # The default: Q4 weights kept 4-bit, a Q8_0 tied table in float32. A small token budget chunks the
    # batched prompts at other points than alone; prefix caching makes later prefills start mid-prompt.
    with Engine.from_pretrained(smollm2_path, batch_invariant=True, max_num_batched_tokens=64) as engine:
        prompts = [engine.chat_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
        batched, alone = batched_and_alone(engine, prompts, max_tokens=24)
    assert_same_answers(batched, alone)


@pytest.mark.parametrize(("family", "dtype"), [("llama", "float32"), ("llama_tied", "float32"), ("llama3", "bfloat16")])
def test_dense_models_answer_in_a_batch_exactly_as_alone(tiny_checkpoints, family, dtype):
    # llama: one query head per kv head (a decode's lone query row); llama_tied: the tied float32 table.
    directory, _ = tiny_checkpoints(family)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (int(n),), generator=generator).tolist() for n in torch.randint(2, 60, (6,), generator=generator)]
    with Engine.from_pretrained(directory, dtype=dtype, batch_invariant=True, max_num_batched_tokens=48) as engine:
        batched, alone = batched_and_alone(engine, prompts, max_tokens=16)
    assert_same_answers(batched, alone)


def test_batch_invariant_is_refused_where_it_does_not_hold(tiny_checkpoints):
    directory, _ = tiny_checkpoints("llama")
    with pytest.raises(ValueError, match="compile_decode"):
        Engine.from_pretrained(directory, batch_invariant=True, compile_decode=True)
    with pytest.raises(ValueError, match="CPU only"):
        Engine.from_pretrained(directory, batch_invariant=True, device="cuda")
    with pytest.raises(ValueError, match="float16"):
        Engine.from_pretrained(directory, batch_invariant=True, dtype="float16")
