"""Our engine against transformers on tiny random checkpoints of every supported family."""

from __future__ import annotations

import pytest
import torch

from chat_core import Engine, LlamaModelRunner, SamplingParams, open_checkpoint
from chat_core.layers.attention import AttentionMetadata
from chat_core.models.llama import LlamaForCausalLM

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "llama_tied"]
PROMPTS = [[5, 17, 33, 2 + 7, 100, 200, 250, 31, 64], [3, 4], list(range(40, 90))]


def reference_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_transformers_at_every_position(tiny_checkpoints, family):
    directory, hf_model = tiny_checkpoints(family)
    checkpoint = open_checkpoint(directory)
    model = LlamaForCausalLM(checkpoint.config, max_positions=512)
    model.load_weights(checkpoint.tensors())
    tokens = PROMPTS[2]
    n = len(tokens)
    block_size = 16
    num_blocks = -(-n // block_size)
    kv_caches = [torch.zeros(2, num_blocks * block_size, model.num_kv_heads_per_rank, checkpoint.config.head_dim) for _ in model.layers]
    metadata = AttentionMetadata.build(
        query_start_loc=torch.tensor([0, n]),
        seq_lens=torch.tensor([n]),
        block_tables=torch.arange(num_blocks).view(1, -1),
        slot_mapping=torch.arange(n),
        block_size=block_size,
        max_query_len=n,
        max_seq_len=n,
    )
    with torch.no_grad():
        logits = model.compute_logits(model(torch.tensor(tokens), torch.arange(n), kv_caches, metadata))
    torch.testing.assert_close(logits, reference_logits(hf_model, tokens), atol=1e-4, rtol=0)


class RecordingRunner(LlamaModelRunner):
    """Keeps the logits of every sampled row, to compare the decode path with the reference."""

    recorded: list[tuple[list[int], torch.Tensor]] = []

    def process_logits(self, logits, model_input):
        RecordingRunner.recorded.append((list(model_input.sampled_seq_ids), logits.clone()))
        return logits


def greedy_reference(hf_model, prompt: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def compare_greedy(hf_model, prompt: list[int], ours: list[int]) -> int:
    """Number of tokens that agree; a disagreement is only allowed at a float32 tie of the reference."""
    reference = greedy_reference(hf_model, prompt, len(ours))
    for i, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            logits = reference_logits(hf_model, prompt + reference[:i])[-1]
            top2 = logits.topk(2).values
            assert float(top2[0] - top2[1]) < 1e-5, f"step {i}: ours {a}, transformers {b}, not a tie"
            return i  # the two paths part at a tie: comparing further would compare different texts
    return len(ours)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_and_decode_logits_match_transformers(tiny_checkpoints, family):
    directory, hf_model = tiny_checkpoints(family)
    RecordingRunner.recorded = []
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with Engine.from_pretrained(directory, model_runner_cls=RecordingRunner, block_size=4) as engine:
        outputs = engine.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    for prompt, output in zip(PROMPTS, outputs):
        assert len(output.token_ids) == 32 and output.finish_reason == "length"
        assert compare_greedy(hf_model, prompt, output.token_ids) == 32

    # Every step's logits (batched, from the paged cache) equal the reference's at that position.
    seq_rows: dict[int, list[torch.Tensor]] = {}
    for seq_ids, logits in RecordingRunner.recorded:
        for row, seq_id in enumerate(seq_ids):
            seq_rows.setdefault(seq_id, []).append(logits[row])
    for seq_id, (prompt, output) in zip(sorted(seq_rows), zip(PROMPTS, outputs)):
        full = reference_logits(hf_model, prompt + output.token_ids)
        ours = torch.stack(seq_rows[seq_id])
        torch.testing.assert_close(ours, full[len(prompt) - 1 : len(prompt) - 1 + 32], atol=1e-4, rtol=0)


def test_sliding_window_matches_transformers(tmp_path):
    from tiny_models import make_tiny_checkpoint

    hf_model = make_tiny_checkpoint(str(tmp_path), "mistral", sliding_window=8)
    prompt = list(range(10, 30))
    with Engine.from_pretrained(str(tmp_path)) as engine:
        output = engine.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert compare_greedy(hf_model, prompt, output.token_ids) == 12
