"""Prefix caching over several ranks: rank 0's scheduler decides, every rank holds the same block layout,
so a hit is a hit on every rank (each computes only the uncached tokens, from its own cached blocks)."""

from __future__ import annotations

import json
import os

import pytest

from chat_core import Engine, LlamaModelRunner, SamplingParams


class StepRecorder(LlamaModelRunner):
    """Appends, for each step this rank runs, the first position and the token count of each sequence."""

    def execute_model(self, model_input, kv_cache, intermediate=None):
        starts = model_input.query_start_loc.tolist()
        positions = model_input.positions.tolist()
        record = [[positions[begin], end - begin] for begin, end in zip(starts, starts[1:])]
        name = f"tp{self.tp.rank}-pp{self.stage.rank}.jsonl"
        with open(os.path.join(self.engine_config.extra["record_dir"], name), "a") as f:
            f.write(json.dumps(record) + "\n")
        return super().execute_model(model_input, kv_cache, intermediate)


def read_records(directory: str) -> dict[str, list[list[list[int]]]]:
    records = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name)) as f:
            records[name] = [json.loads(line) for line in f]
    return records


@pytest.mark.parametrize("tp,pp,control_plane", [(3, 1, "broadcast"), (1, 2, "spmd")])
def test_smollm2_parallel_runs_hit_the_cache_on_every_rank(smollm2_engine, smollm2_path, tmp_path, tp, pp, control_plane):
    prompt = smollm2_engine.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    num_prompt_tokens = len(prompt["prompt_token_ids"])
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    expected = smollm2_engine.generate(prompt, params)[0].token_ids
    with Engine.from_pretrained(
        smollm2_path,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        control_plane=control_plane,
        model_runner_cls=StepRecorder,
        extra={"record_dir": str(tmp_path)},
    ) as engine:
        first = engine.generate(prompt, params)[0]
        second = engine.generate(prompt, params)[0]
    assert first.token_ids == second.token_ids == expected
    cached = (num_prompt_tokens - 1) // 16 * 16
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == cached > 0

    records = read_records(str(tmp_path))
    assert len(records) == tp * pp
    steps = records["tp0-pp0.jsonl"]
    assert all(rank_steps == steps for rank_steps in records.values())  # the same work, step by step
    assert steps[0] == [[0, num_prompt_tokens]]  # the first request computes its whole prompt
    assert steps[4] == [[cached, num_prompt_tokens - cached]]  # the second only what was not cached
