"""Prefill and mixed steps attended in parts (`SplitAttentionMetadata`) where one padded call would compute far
more scores than the step needs: against the padded reference, and end to end against sequences run alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chat_core import Engine, SamplingParams
from chat_core.layers.attention import (
    MAX_PADDED_SCORES_PER_SCORE,
    AttentionMetadata,
    PaddedAttentionMetadata,
    SplitAttentionMetadata,
    attention_groups,
)
from decode_cases import Recorder


@st.composite
def mixed_steps(draw):
    """(block_size, kv_heads, group, head_dim, [(query_len, seq_len)], window, seed): decodes beside prefills
    (whole prompts or chunks after a cached part), lengths spread so that padding often wastes."""
    block_size = draw(st.sampled_from([4, 16]))
    decodes = draw(st.lists(st.integers(1, 6 * block_size), max_size=6))
    prefills = draw(st.lists(st.tuples(st.integers(2, 3 * block_size), st.integers(0, 3 * block_size)), min_size=1, max_size=3))
    rows = [(1, n) for n in decodes] + [(q, q + cached) for q, cached in prefills]
    rows = draw(st.permutations(rows))
    return (
        block_size,
        draw(st.sampled_from([1, 2])),
        draw(st.sampled_from([1, 3, 4])),
        draw(st.sampled_from([16, 32])),
        rows,
        draw(st.one_of(st.none(), st.integers(1, 3 * block_size))),
        draw(st.integers(0, 2**16)),
    )


def make_step(block_size, num_kv_heads, group, head_dim, rows, seed):
    """A cache holding every sequence's keys (the step's new ones included: attention reads them after the
    write), NaN in every slot no sequence owns, and the step's packed queries and slots."""
    generator = torch.Generator().manual_seed(seed)
    widths = [-(-seq_len // block_size) for _, seq_len in rows]
    num_blocks = sum(widths) + 1
    key_cache = torch.full((num_blocks * block_size, num_kv_heads, head_dim), float("nan"))
    value_cache = torch.full_like(key_cache, float("nan"))
    order = torch.randperm(num_blocks, generator=generator)
    pad_block = int(order[-1])
    tables = torch.full((len(rows), max(widths)), pad_block)
    slots, used = [], 0
    for row, ((query_len, seq_len), width) in enumerate(zip(rows, widths)):
        tables[row, :width] = order[used : used + width]
        used += width
        positions = torch.arange(seq_len)
        seq_slots = tables[row, positions // block_size] * block_size + positions % block_size
        key_cache[seq_slots] = torch.randn(seq_len, num_kv_heads, head_dim, generator=generator)
        value_cache[seq_slots] = torch.randn(seq_len, num_kv_heads, head_dim, generator=generator)
        slots.append(seq_slots[seq_len - query_len :])
    key_cache[pad_block * block_size] = 0.0  # the padded reference's finite pad slot
    value_cache[pad_block * block_size] = 0.0
    q = torch.randn(sum(q for q, _ in rows), num_kv_heads * group, head_dim, generator=generator)
    return q, key_cache, value_cache, tables, torch.cat(slots), pad_block * block_size


def metadata_of(rows, tables, slot_mapping, block_size, window, pad_slot, *, host_lens: bool) -> AttentionMetadata:
    query_lens, seq_lens = [q for q, _ in rows], [n for _, n in rows]
    return AttentionMetadata.build(
        query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()]),
        seq_lens=torch.tensor(seq_lens),
        block_tables=tables,
        slot_mapping=slot_mapping,
        block_size=block_size,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        sliding_window=window,
        pad_slot=pad_slot,
        host_query_lens=query_lens if host_lens else None,
        host_seq_lens=seq_lens if host_lens else None,
    )


@settings(max_examples=60, deadline=None)
@given(mixed_steps())
def test_a_split_step_attends_as_the_padded_reference(case):
    block_size, num_kv_heads, group, head_dim, rows, window, seed = case
    q, key_cache, value_cache, tables, slot_mapping, pad_slot = make_step(block_size, num_kv_heads, group, head_dim, rows, seed)
    reference = metadata_of(rows, tables, slot_mapping, block_size, window, pad_slot, host_lens=False)
    metadata = metadata_of(rows, tables, slot_mapping, block_size, window, pad_slot, host_lens=True)
    groups = attention_groups([q for q, _ in rows], [n for _, n in rows])
    assert isinstance(reference, PaddedAttentionMetadata)
    assert isinstance(metadata, SplitAttentionMetadata if groups is not None else PaddedAttentionMetadata)
    scale = head_dim**-0.5
    expected = reference.attend(q, key_cache, value_cache, scale)
    torch.testing.assert_close(metadata.attend(q, key_cache, value_cache, scale), expected, atol=1e-5, rtol=1e-5)


def test_a_long_chunk_beside_decodes_is_split_and_reads_what_it_needs():
    rows = [(1, 90), (40, 100), (1, 7), (1, 60), (1, 33)]  # padded: 5 x 40 x 100 scores for 40 x 100 + 190
    q, key_cache, value_cache, tables, slot_mapping, pad_slot = make_step(16, 2, 3, 16, rows, seed=0)
    metadata = metadata_of(rows, tables, slot_mapping, 16, None, pad_slot, host_lens=True)
    assert isinstance(metadata, SplitAttentionMetadata)
    (decode_tokens, decodes), (prefill_tokens, prefill) = metadata.parts
    assert decode_tokens.tolist() == [0, 41, 42, 43] and prefill_tokens.tolist() == list(range(1, 41))
    assert not isinstance(decodes, PaddedAttentionMetadata) or decodes.max_query_len == 1  # the CPU's decode kernel
    assert isinstance(prefill, PaddedAttentionMetadata) and (prefill.batch, prefill.max_query_len, prefill.max_seq_len) == (1, 40, 100)
    expected = metadata_of(rows, tables, slot_mapping, 16, None, pad_slot, host_lens=False).attend(q, key_cache, value_cache, 0.25)
    torch.testing.assert_close(metadata.attend(q, key_cache, value_cache, 0.25), expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 50), st.integers(0, 200)), min_size=1, max_size=12))
def test_attention_groups_partition_the_rows_and_pad_within_the_limit(lens):
    query_lens, seq_lens = [q for q, _ in lens], [q + cached for q, cached in lens]
    groups = attention_groups(query_lens, seq_lens)

    def padded(rows):
        return len(rows) * max(query_lens[r] for r in rows) * max(seq_lens[r] for r in rows)

    def needed(rows):
        return sum(query_lens[r] * seq_lens[r] for r in rows)

    everyone = list(range(len(lens)))
    if groups is None:  # pure decode steps are the decode kernels' business; otherwise one call pads within the limit
        assert max(query_lens) == 1 or padded(everyone) <= MAX_PADDED_SCORES_PER_SCORE * needed(everyone)
        return
    assert sorted(r for g in groups for r in g) == everyone and all(groups)
    assert padded(everyone) > MAX_PADDED_SCORES_PER_SCORE * needed(everyone)
    for rows in groups:
        decodes = [query_lens[r] == 1 for r in rows]
        assert all(decodes) or not any(decodes)  # a decode group, or prefills
        if not any(decodes):
            assert len(rows) == 1 or padded(rows) <= MAX_PADDED_SCORES_PER_SCORE * needed(rows)


class KindRecorder(Recorder):
    """Also counts the attention kinds its steps took."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kinds: dict[str, int] = {}

    def attention_metadata(self, model_input):
        metadata = super().attention_metadata(model_input)
        self.kinds[metadata.kind] = self.kinds.get(metadata.kind, 0) + 1
        return metadata


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_a_long_prompt_chunked_beside_decodes_gives_the_tokens_and_logits_it_gets_alone(tiny_checkpoints, family):
    """Six short prompts decode while a long one is prefilled in chunks of 18 tokens: each chunk shares a step
    with six decodes, which splits (padded, 7 x 18 x up to 100 scores where 18 x 100 + 6 x 10 are needed).
    Every sequence's tokens and logits (1e-4) are those it gets alone."""
    directory, _ = tiny_checkpoints(family)
    prompts = [[5, 17, 33], [3, 4], [7] * 5, [11, 12, 13, 14], [9, 8], [21, 22, 23], list(range(40, 140))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    options = dict(dtype="float32", block_size=16, max_num_batched_tokens=24, model_runner_cls=KindRecorder, enable_prefix_caching=False)
    with Engine.from_pretrained(directory, **options) as engine:
        together = engine.generate([{"prompt_token_ids": p} for p in prompts], params)
        runner = engine.executor.worker.model_runner
        assert runner.kinds.get("split", 0) >= 5, runner.kinds
        logits_together = {seq_id: torch.stack(rows) for seq_id, rows in runner.logits.items()}
        seq_ids = sorted(logits_together)  # in the order the prompts were added
        for prompt, output, seq_id in zip(prompts, together, seq_ids):
            runner.logits.clear()
            [alone] = engine.generate([{"prompt_token_ids": prompt}], params)
            assert alone.token_ids == output.token_ids
            [rows] = runner.logits.values()
            torch.testing.assert_close(logits_together[seq_id], torch.stack(rows), atol=1e-4, rtol=0)
