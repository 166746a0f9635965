"""Checkpoint loading: shards, dtypes, and a tensor-parallel rank reading only its own slices."""

from __future__ import annotations

import os

import pytest
import torch

from chat_core import Engine, SamplingParams, open_checkpoint
from chat_core.models.llama import LlamaForCausalLM

PROMPT = {"prompt_token_ids": [5, 17, 33, 9, 100, 200, 250, 31]}
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def test_a_sharded_checkpoint_loads_like_a_single_file(tmp_path, tiny_checkpoints):
    directory, hf_model = tiny_checkpoints("llama3")
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="100KB")
    assert os.path.exists(sharded / "model.safetensors.index.json")
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
    with Engine.from_pretrained(directory) as single, Engine.from_pretrained(str(sharded)) as from_shards:
        assert from_shards.generate(PROMPT, GREEDY)[0].token_ids == single.generate(PROMPT, GREEDY)[0].token_ids


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_follows_the_float32_model(tiny_checkpoints, dtype):
    directory, _ = tiny_checkpoints("llama")
    with Engine.from_pretrained(directory) as full, Engine.from_pretrained(directory, dtype=dtype) as reduced:
        assert next(reduced.executor.worker.model_runner.model.parameters()).dtype == getattr(torch, dtype)
        expected = full.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0))[0]
        got = reduced.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0))[0]
    assert got.token_ids[0] == expected.token_ids[0]
    assert got.outputs[0].logprobs[0].logprob == pytest.approx(expected.outputs[0].logprobs[0].logprob, abs=0.05)


class FixedRank:
    """Which slice a tensor-parallel rank holds; loading needs no communication, so no process group."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def all_reduce(self, tensor):  # pragma: no cover - loading never communicates
        raise AssertionError("loading must not communicate")

    all_gather = all_reduce


@pytest.mark.parametrize("family,num_kv_heads", [("mistral", 2), ("llama", 1)])
def test_a_tensor_parallel_rank_loads_exactly_its_slices(tmp_path, family, num_kv_heads):
    from tiny_models import make_tiny_checkpoint

    hf_model = make_tiny_checkpoint(str(tmp_path), family, num_key_value_heads=num_kv_heads)
    full = hf_model.state_dict()
    checkpoint = open_checkpoint(str(tmp_path))
    config = checkpoint.config
    head_dim, heads, kv_heads = config.head_dim, config.num_heads, config.num_kv_heads
    for rank in range(2):
        model = LlamaForCausalLM(config, max_positions=64, tp=FixedRank(rank, 2))
        model.load_weights(checkpoint.tensors())
        attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
        q_rows = slice(rank * heads // 2 * head_dim, (rank + 1) * heads // 2 * head_dim)
        kv_head = rank * kv_heads // 2  # with fewer kv heads than ranks, each rank keeps a copy of one
        kv_rows = slice(kv_head * head_dim, (kv_head + max(1, kv_heads // 2)) * head_dim)
        kv_size = attn.num_kv_heads * head_dim
        q, k, v = attn.qkv_proj.weight.split([attn.num_heads * head_dim, kv_size, kv_size])
        assert torch.equal(q, full["model.layers.0.self_attn.q_proj.weight"][q_rows])
        assert torch.equal(k, full["model.layers.0.self_attn.k_proj.weight"][kv_rows])
        assert torch.equal(v, full["model.layers.0.self_attn.v_proj.weight"][kv_rows])
        inner = config.intermediate_size // 2
        assert torch.equal(mlp.down_proj.weight, full["model.layers.0.mlp.down_proj.weight"][:, rank * inner : (rank + 1) * inner])
        gate, up = mlp.gate_up_proj.weight.chunk(2)
        assert torch.equal(gate, full["model.layers.0.mlp.gate_proj.weight"][rank * inner : (rank + 1) * inner])
        vocab_rows = slice(rank * config.vocab_size // 2, (rank + 1) * config.vocab_size // 2)
        assert torch.equal(model.embed_tokens.weight, full["model.embed_tokens.weight"][vocab_rows])
        total = sum(p.numel() for p in model.parameters())
        assert total < 0.6 * sum(t.numel() for t in full.values())  # no rank holds the whole model
