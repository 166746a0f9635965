"""Decode speed of the AsyncEngine's drivers on SmolLM2, against the plain Engine in the same run.

One request at a time (batch 1, greedy, a fixed number of tokens), timed from its first token to its
last, so what differs is who drives the steps:
- engine: `Engine.stream` on the main thread, which loaded the model (the reference);
- event_loop: `AsyncEngine.generate` with the engine loop as a task on the running asyncio loop, on
  the main thread (what a notebook gets);
- thread: the same requests, with the engine loop on a background thread (the default outside a loop).
The first two share one Engine; the thread gets its own, also loaded on the main thread (an Engine is
driven by one loop at a time). Passes are interleaved (engine, event_loop, thread, engine, ...); each
figure is the median over passes, and each ratio is to the engine's median. Prints a table and
writes benchmarks/results/async_engine.json.

    python benchmarks/bench_async_engine.py [--passes 5] [--max-tokens 64] [--model M] [--quantize auto|none|int8|int4|gguf]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from chat_core import AsyncEngine, Engine, SamplingParams
from bench_results import results_path, write_results

PROMPT = "Write a short story about a lighthouse keeper."
DRIVERS = ("engine", "event_loop", "thread")


def decode_tokens_per_s(arrivals: list[float]) -> float:
    """Tokens after the first, per second: the steady decode rate, without the prefill."""
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])


def run_engine(engine: Engine, params: SamplingParams) -> float:
    arrivals = []
    for delta in engine.stream(PROMPT, params):
        arrivals += [time.perf_counter()] * len(delta.token_ids)
    return decode_tokens_per_s(arrivals)


async def run_async_engine(async_engine: AsyncEngine, params: SamplingParams) -> float:
    arrivals: list[float] = []
    async for output in async_engine.generate(PROMPT, params):
        arrivals += [time.perf_counter()] * (len(output.token_ids) - len(arrivals))
    return decode_tokens_per_s(arrivals)


def run_event_loop(engine: Engine, params: SamplingParams) -> float:
    async def main() -> float:
        async_engine = AsyncEngine(engine)  # made inside a running loop: the "event_loop" driver
        assert async_engine.driver == "event_loop"
        return await run_async_engine(async_engine, params)

    return asyncio.run(main())  # the engine task ends with the loop; the Engine stays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quantize", default="auto", help="the weights' format, as chat-cli's --quantize")
    parser.add_argument("--output", default=results_path("async_engine.json"))
    args = parser.parse_args()

    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    engine = Engine.from_pretrained(args.model, quantization=args.quantize)
    threaded = AsyncEngine(Engine.from_pretrained(args.model, quantization=args.quantize), driver="thread")
    runners = {
        "engine": lambda: run_engine(engine, params),
        "event_loop": lambda: run_event_loop(engine, params),
        "thread": lambda: asyncio.run(run_async_engine(threaded, params)),
    }
    for run in runners.values():  # warm-up: first-call costs out of the figures
        run()
    rates: dict[str, list[float]] = {name: [] for name in DRIVERS}
    for _ in range(args.passes):
        for name in DRIVERS:
            rates[name].append(runners[name]())
    threaded.shutdown()
    engine.shutdown()

    reference = statistics.median(rates["engine"])
    rows = [
        {
            "driver": name,
            "decode_tokens_per_s_median": statistics.median(rates[name]),
            "ratio_to_engine": statistics.median(rates[name]) / reference,
            "passes": rates[name],
        }
        for name in DRIVERS
    ]
    weights = engine.config.quantization or engine.config.dtype
    print(f"{args.model} ({weights}), batch 1, {args.max_tokens} tokens, {args.passes} interleaved passes, ", end="")
    print(f"torch threads {torch.get_num_threads()}")
    print(f"{'driver':<12} {'decode tok/s':>13} {'vs engine':>10}")
    for row in rows:
        print(f"{row['driver']:<12} {row['decode_tokens_per_s_median']:>13.1f} {row['ratio_to_engine']:>10.2f}")
    summary = {"model": args.model, "weights": weights, "max_tokens": args.max_tokens, "passes": args.passes}
    write_results(args.output, {**summary, "rows": rows})


if __name__ == "__main__":
    main()
