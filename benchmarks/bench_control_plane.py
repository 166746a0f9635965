"""The two control planes compared per decode step, at tp=2 and pp=2 on this machine.

For each layout and control plane: a batch of 8 sequences is prefilled, then decoded; over the decode
steps we count, on rank 0, the control-plane collectives (metadata broadcasts and tensor broadcasts)
and point-to-point transfers (stage to stage, sampled tokens back to rank 0), the bytes they move,
the time rank 0 spends getting the step's inputs out (the control plane) and the time of the step.
Prints a table and writes benchmarks/results/control_plane.json.

    python benchmarks/bench_control_plane.py [--steps 48] [--batch 8]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from bench_results import results_path, write_results


def make_model(directory: str) -> None:
    """A random Llama with SmolLM2-135M's shape but 8 heads (SmolLM2's 9 do not split over 2 ranks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)


def measure(model: str, tp: int, pp: int, control_plane: str, batch: int, steps: int) -> dict[str, float]:
    from chat_core import Engine, SamplingParams
    from chat_distributed.communication import communication_stats, reset_communication_stats

    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    with Engine.from_pretrained(model, tensor_parallel_size=tp, pipeline_parallel_size=pp, control_plane=control_plane) as engine:
        generator = engine.generator
        for i in range(batch):
            engine.add_request({"prompt_token_ids": list(range(100 + i, 132 + i))}, params)
        generator.step()  # the prefill
        driver = engine.executor.driver
        reset_communication_stats()
        before = (driver.step_stats.steps, driver.step_stats.step_seconds, driver.step_stats.control_plane_seconds)
        decode_steps = 0
        while generator.has_unfinished_requests():
            generator.step()
            decode_steps += 1
        stats = communication_stats()
        step_s = (driver.step_stats.step_seconds - before[1]) / decode_steps
        control_s = (driver.step_stats.control_plane_seconds - before[2]) / decode_steps
    return {
        "decode_steps": decode_steps,
        "collectives_per_step": stats.collectives / decode_steps,
        "metadata_messages_per_step": stats.metadata_messages / decode_steps,
        "tensor_messages_per_step": stats.tensor_messages / decode_steps,
        "bytes_per_step": stats.bytes_moved / decode_steps,
        "control_plane_ms_per_step": control_s * 1000,
        "step_ms": step_s * 1000,
        "control_plane_share": control_s / step_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        make_model(directory)
        for tp, pp in [(2, 1), (1, 2)]:
            for control_plane in ("broadcast", "spmd"):
                row = measure(directory, tp, pp, control_plane, args.batch, args.steps)
                rows.append({"tp": tp, "pp": pp, "control_plane": control_plane, **row})
    columns = ["collectives_per_step", "metadata_messages_per_step", "tensor_messages_per_step", "bytes_per_step", "control_plane_ms_per_step", "step_ms", "control_plane_share"]
    print(f"{'layout':<8}{'plane':<11}" + "".join(f"{c:>28}" for c in columns))
    for row in rows:
        print(f"tp{row['tp']}pp{row['pp']:<4}{row['control_plane']:<11}" + "".join(f"{row[c]:>28.3f}" for c in columns))
    note = "counted on rank 0; tensor-parallel all-reduces inside the model are not control-plane traffic and are not counted"
    write_results(results_path("control_plane.json"), {"settings": vars(args), "rows": rows, "note": note})


if __name__ == "__main__":
    main()
