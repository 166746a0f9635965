"""A mixed step's attention, padded in one call or split in parts (`layers/attention.py`, `attention_groups`).

SmolLM2 (the default model): 15 sequences with 1000-token prompts decode while a 2048-token prompt arrives and
is prefilled in chunks that share steps with them (513 new tokens beside 15 decodes of ~1000-token histories).
Each such step is timed with the step split (the default) and with one padded call for the whole step (the
split threshold set to infinity), the two in alternating rounds; medians. Prints a table, writes JSON.

    python benchmarks/bench_mixed_step.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench_results import results_path, write_results

DECODERS, DECODER_PROMPT, LONG_PROMPT, TOKEN_BUDGET = 15, 1000, 2048, 528


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import chat_core.layers.attention as attention
    from chat_core import Engine, SamplingParams

    engine = Engine.from_pretrained(
        max_num_batched_tokens=TOKEN_BUDGET, max_num_seqs=DECODERS + 1, enable_prefix_caching=False, kv_cache_memory_gib=1.0
    )
    runner = engine.executor.worker.model_runner
    run_step = runner.execute_model
    times: dict[str, list[float]] = {"split": [], "padded": []}
    mode = "split"

    def timed_step(model_input, kv_cache, intermediate=None):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = run_step(model_input, kv_cache, intermediate)
        lens = model_input.host_query_lens
        if lens and len(lens) == DECODERS + 1 and sorted(lens)[-2] == 1 and max(lens) > 100:  # a chunk beside every decode
            times[mode].append(time.perf_counter() - start)
        return out

    runner.execute_model = timed_step
    threshold = attention.MAX_PADDED_SCORES_PER_SCORE
    for round_index in range(args.rounds):
        for mode in ("split", "padded") if round_index % 2 == 0 else ("padded", "split"):
            attention.MAX_PADDED_SCORES_PER_SCORE = threshold if mode == "split" else float("inf")
            decode = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
            for i in range(DECODERS):
                engine.add_request([100 + (i * 7 + j) % 20000 for j in range(DECODER_PROMPT)], decode)
            for _ in range(-(-DECODERS * DECODER_PROMPT // TOKEN_BUDGET)):  # their prompts prefilled; they decode
                engine.generator.step()
            engine.add_request([300 + j % 20000 for j in range(LONG_PROMPT)], SamplingParams(temperature=0, max_tokens=1))
            while engine.generator.has_unfinished_requests():
                engine.generator.step()
    attention.MAX_PADDED_SCORES_PER_SCORE = threshold
    engine.shutdown()

    rows = {name: {"steps": len(ts), "median_ms": statistics.median(ts) * 1000} for name, ts in times.items() if ts}
    print(f"{'attention':<10}{'steps':>8}{'median ms':>12}")
    for name, row in rows.items():
        print(f"{name:<10}{row['steps']:>8}{row['median_ms']:>12.1f}")
    ratio = rows["padded"]["median_ms"] / rows["split"]["median_ms"] if len(rows) == 2 else None
    if ratio:
        print(f"\nsplit is {ratio:.2f}x faster than padded")
    write_results(results_path("mixed-step.json"), {"settings": vars(args), "rows": rows, "padded_over_split": ratio})


if __name__ == "__main__":
    main()
