"""Multi-turn chat on SmolLM2: time to first token per turn, with and without prefix caching, in the same run.

A 10-turn conversation (each turn a ~45-token question and the model's answer of up to 150 tokens,
~150 tokens a turn, ~1,500 tokens of history by the last turn) through the chat template on two
engines, one with prefix caching and one without (the cache is cleared before each pass). Both take
each turn back to back on the same prompt, the first to go alternating, since this machine's load
comes in bursts. The caching engine answers every turn, as in a real chat; the other generates only
the first token. After the last turn, a short follow-up question (~20 new tokens after ~1,500 tokens
of history). Also measured, in the same passes: the time to first token of a fresh 32-token prompt
(the target: the turn after ~1,500 tokens of history within 2x of it), and, for the
case where nothing is shared, a batch of distinct prompts on both engines (caching must cost nothing
there). Medians over passes; prints a table and writes JSON to benchmarks/results/multiturn.json.

    python benchmarks/bench_multiturn.py [--passes 3] [--turns 10] [--answer-tokens 150] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from bench_results import results_path, write_results

FRESH_PROMPT = (
    "The history of the printing press begins in the fifteenth century, when movable type changed how "
    "books were made, how ideas travelled across Europe, and how people learned to read and write."
)
FOLLOW_UP = "Thank you! One more example, please."
SUBJECTS = [
    "the water cycle", "how bridges carry weight", "why the sky is blue", "the life of honey bees",
    "how vaccines work", "the causes of tides", "how a compiler works", "the history of paper",
    "how plants make food", "why ice floats", "the invention of the telescope", "how birds migrate",
]  # fmt: skip


def question(turn: int, subject: str) -> str:
    """A ~45-token question."""
    return (
        f"Question {turn + 1}: I am reading about {subject} and would like to understand it better. Please explain "
        f"{subject} in a few plain sentences, as you would to a curious student, with one everyday example."
    )


def timed_request(engine, prompt: dict, max_tokens: int) -> tuple[float, object]:
    """(seconds to the first token, the finished output) of one request run alone."""
    from chat_core import SamplingParams

    start = time.perf_counter()
    first = None
    request_id = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
    output = None
    while output is None or not output.finished:
        for step_output in engine.generator.step():
            if step_output.request_id == request_id:
                output = step_output
                if first is None and output.outputs[0].token_ids:
                    first = time.perf_counter() - start
    return first, output


def run_conversation(engines: dict, turns: int, answer_tokens: int, flip: int) -> dict[str, dict[str, list]]:
    """Both engines take each turn back to back, on the same prompt (who goes first alternates).

    The caching engine answers each turn, as in a real chat (the answer's keys and values are computed
    while it is generated, and the next turn finds them); the other generates only the first token.
    After the last turn comes a short follow-up (the last entry): about as many new tokens as the fresh
    32-token prompt, after the whole history."""
    messages: list[dict] = []
    result = {mode: {"ttft_s": [], "prompt_tokens": [], "cached_tokens": []} for mode in engines}
    for turn in range(turns + 1):
        content = question(turn, SUBJECTS[turn % len(SUBJECTS)]) if turn < turns else FOLLOW_UP
        messages.append({"role": "user", "content": content})
        prompt = engines["cached"].chat_prompt(messages)
        answer = None
        for mode in list(engines) if (turn + flip) % 2 == 0 else list(engines)[::-1]:
            ttft, output = timed_request(engines[mode], prompt, answer_tokens if mode == "cached" else 1)
            result[mode]["ttft_s"].append(ttft)
            result[mode]["prompt_tokens"].append(len(prompt["prompt_token_ids"]))
            result[mode]["cached_tokens"].append(output.num_cached_tokens)
            if mode == "cached":
                answer = output.text
        messages.append({"role": "assistant", "content": answer})
    return result


def fresh_prompt_ttft(engine, tokens: list[int]) -> float:
    from chat_core import SamplingParams

    engine.reset_prefix_cache()
    start = time.perf_counter()
    engine.generate({"prompt_token_ids": tokens}, SamplingParams(temperature=0, max_tokens=1))
    return time.perf_counter() - start


def distinct_batch_seconds(engine, vocab_size: int, seed: int, batch: int = 8, prompt_len: int = 256, new_tokens: int = 32) -> float:
    """A batch of prompts that share no block: what prefix caching costs when it cannot help."""
    from chat_core import SamplingParams

    rng = random.Random(seed)
    prompts = [{"prompt_token_ids": [rng.randrange(100, vocab_size) for _ in range(prompt_len)]} for _ in range(batch)]
    engine.reset_prefix_cache()
    start = time.perf_counter()
    outputs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    elapsed = time.perf_counter() - start
    assert all(o.num_cached_tokens == 0 for o in outputs)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--answer-tokens", type=int, default=150)
    parser.add_argument("--output", default=results_path("multiturn.json"))
    args = parser.parse_args()

    from chat_core import Engine

    engines = {
        "cached": Engine.from_pretrained(args.model, dtype=args.dtype),
        "uncached": Engine.from_pretrained(args.model, dtype=args.dtype, enable_prefix_caching=False),
    }
    fresh_tokens = engines["cached"].tokenizer.encode(FRESH_PROMPT)[:32]
    vocab_size = engines["cached"].model_config.vocab_size
    for engine in engines.values():  # warm up: first-call allocations are not what we measure
        fresh_prompt_ttft(engine, fresh_tokens)
        distinct_batch_seconds(engine, vocab_size, seed=-1, batch=2, new_tokens=4)

    ttfts = {mode: [] for mode in engines}  # per pass: a list of per-turn TTFTs
    fresh = {mode: [] for mode in engines}
    distinct = {mode: [] for mode in engines}
    for p in range(args.passes):
        for engine in engines.values():
            engine.reset_prefix_cache()
        run = run_conversation(engines, args.turns, args.answer_tokens, flip=p)
        for mode in engines:
            ttfts[mode].append(run[mode]["ttft_s"])
        for repeat in range(5):  # the same interleaving for the short measurements
            for mode in list(engines) if (p + repeat) % 2 == 0 else list(engines)[::-1]:
                fresh[mode].append(fresh_prompt_ttft(engines[mode], fresh_tokens))
        for mode in list(engines) if p % 2 == 0 else list(engines)[::-1]:
            distinct[mode].append(distinct_batch_seconds(engines[mode], vocab_size, seed=p))
        last = {mode: run[mode]["ttft_s"][-1] * 1000 for mode in engines}
        print(f"pass {p + 1}/{args.passes}: last turn {last['cached']:.0f} ms cached, {last['uncached']:.0f} ms uncached", file=sys.stderr)
    prompt_lens = {mode: run[mode]["prompt_tokens"] for mode in engines}
    cached_tokens = {mode: run[mode]["cached_tokens"] for mode in engines}
    for engine in engines.values():
        engine.shutdown()

    def per_turn_median(mode: str) -> list[float]:
        return [statistics.median(pass_ttfts[t] for pass_ttfts in ttfts[mode]) * 1000 for t in range(args.turns + 1)]

    cached_ms, uncached_ms = per_turn_median("cached"), per_turn_median("uncached")
    fresh_ms = statistics.median(fresh["uncached"]) * 1000
    fresh_cached_engine_ms = statistics.median(fresh["cached"]) * 1000
    distinct_ratio = statistics.median(c / u for c, u in zip(distinct["cached"], distinct["uncached"]))
    fresh_ratio = statistics.median(c / u for c, u in zip(fresh["cached"], fresh["uncached"]))

    print(f"{'turn':>4} {'prompt tok':>10} {'cached tok':>10} {'TTFT cached':>12} {'TTFT uncached':>14} {'speed-up':>9}")
    for t in range(args.turns + 1):
        print(
            f"{t + 1 if t < args.turns else 'next':>4} {prompt_lens['cached'][t]:>10} {cached_tokens['cached'][t]:>10} {cached_ms[t]:>9.0f} ms "
            f"{uncached_ms[t]:>11.0f} ms {uncached_ms[t] / cached_ms[t]:>8.1f}x"
        )
    last_vs_fresh = cached_ms[args.turns - 1] / fresh_ms
    follow_up_vs_fresh = cached_ms[-1] / fresh_ms
    print(f"\nfresh 32-token prompt: {fresh_ms:.0f} ms (on the caching engine, nothing cached: {fresh_cached_engine_ms:.0f} ms)")
    print(f"nothing shared, fresh 32-token prompt: caching on / off time to first token = {fresh_ratio:.3f}")
    print(
        f"turn {args.turns} ({prompt_lens['cached'][args.turns - 1]} prompt tokens, "
        f"{prompt_lens['cached'][args.turns - 1] - cached_tokens['cached'][args.turns - 1]} computed) with caching = "
        f"{last_vs_fresh:.2f}x the fresh 32-token prompt; without caching {uncached_ms[args.turns - 1] / fresh_ms:.1f}x"
    )
    print(
        f"the next, short turn ({prompt_lens['cached'][-1]} prompt tokens, "
        f"{prompt_lens['cached'][-1] - cached_tokens['cached'][-1]} computed) with caching = {follow_up_vs_fresh:.2f}x the "
        f"fresh 32-token prompt (target <= 2x); without caching {uncached_ms[-1] / fresh_ms:.1f}x"
    )
    print(f"nothing shared (8 distinct 256-token prompts, 32 new tokens each): caching on / off wall time = {distinct_ratio:.3f}")

    report = {
        "model": args.model,
        "dtype": args.dtype,
        "passes": args.passes,
        "answer_tokens": args.answer_tokens,
        "cpu_count": os.cpu_count(),
        "turns": [
            {
                "turn": t + 1,
                "short_follow_up": t == args.turns,
                "prompt_tokens": prompt_lens["cached"][t],
                "cached_tokens": cached_tokens["cached"][t],
                "ttft_cached_ms": round(cached_ms[t], 1),
                "ttft_uncached_ms": round(uncached_ms[t], 1),
            }
            for t in range(args.turns + 1)
        ],
        "fresh_32_token_ttft_ms": round(fresh_ms, 1),
        "fresh_32_token_ttft_on_caching_engine_ms": round(fresh_cached_engine_ms, 1),
        "last_turn_vs_fresh_prompt": round(last_vs_fresh, 2),
        "next_short_turn_vs_fresh_prompt": round(follow_up_vs_fresh, 2),
        "nothing_shared_wall_time_ratio_cached_over_uncached": round(distinct_ratio, 3),
        "nothing_shared_fresh_prompt_ttft_ratio_cached_over_uncached": round(fresh_ratio, 3),
    }
    write_results(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
