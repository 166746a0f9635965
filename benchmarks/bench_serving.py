"""`chat-cli serve` under load: N concurrent streaming clients (1, 8, 32) against a real server on SmolLM2.

Each client sends `--requests-per-client` chat completions one after another (greedy, a fixed
number of output tokens, so every level does the same work per request) and times every chunk.
Reports requests/s, output tokens/s, time to first token and inter-token latency (median, p99).

A second case, a shared ~500-token system prompt: every request has the same system prompt and its
own question; it runs against two servers, with prefix caching and without (`--no-prefix-caching`),
in interleaved passes, and reports throughput and time to first token of each (medians over
passes) and their ratio.

Prints tables and writes JSON to benchmarks/results/serving.json. The clients run in this process,
on the same machine as the servers, so they take a little of their CPU.

    python benchmarks/bench_serving.py [--clients 1 8 32] [--requests-per-client 3] [--max-tokens 64]
                                       [--cases levels shared-system] [--shared-system-passes 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import httpx
from bench_results import results_path, write_results

TOPICS = ["the ocean", "a lighthouse", "the moon", "a city at night", "an old library", "the desert", "a forest", "a train"]

# ~500 tokens of instructions that every request of the shared-system-prompt case starts with.
SHARED_SYSTEM_PROMPT = " ".join(
    f"Rule {i + 1}: when a traveller asks about {place}, answer politely, mention the opening hours, the price "
    f"of a ticket and the nearest station, and never invent facts you are not sure about."
    for i, place in enumerate(
        ["the museum", "the harbour", "the old castle", "the botanical garden", "the cathedral", "the zoo",
         "the river cruise", "the market", "the art gallery", "the science centre", "the aquarium", "the opera"]
    )
)  # fmt: skip
QUESTIONS = [
    "When does the museum open on Sundays?", "How much is a ticket for the harbour tour?",
    "Which station is closest to the castle?", "Is the botanical garden open in winter?",
    "Can children visit the cathedral tower?", "How do I get to the zoo by train?",
    "How long is the river cruise?", "What can I buy at the market?",
]  # fmt: skip


@dataclass
class RequestTiming:
    ttft_s: float
    inter_token_s: list[float]
    output_tokens: int
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class LevelResult:
    clients: int
    requests: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_median_ms: float
    ttft_p99_ms: float
    itl_median_ms: float
    itl_p99_ms: float
    max_sequences_in_step: int


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "chat_cli", "serve", "--port", "0", "--model", model, *extra],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in process.stdout:
        ready = re.match(r"^serving .+ on (http://\S+)$", line.strip())
        if ready:
            return process, ready[1]
    raise RuntimeError(f"the server exited with code {process.wait()} before it was ready")


@dataclass
class SharedSystemResult:
    prefix_caching: bool
    requests: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_median_ms: float
    prompt_tokens_median: float
    cached_tokens_median: float


async def one_request(
    client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, system: str | None = None
) -> RequestTiming:
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    body = {
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    arrivals: list[float] = []
    output_tokens = prompt_tokens = cached_tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                output_tokens = chunk["usage"]["completion_tokens"]
                prompt_tokens = chunk["usage"]["prompt_tokens"]
                cached_tokens = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
            elif any(choice["delta"].get("content") for choice in chunk["choices"]):
                arrivals.append(time.perf_counter())
    assert output_tokens == max_tokens, output_tokens
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return RequestTiming(arrivals[0] - start, gaps, output_tokens, prompt_tokens, cached_tokens)


async def run_level(
    url: str, clients: int, requests_per_client: int, max_tokens: int, system: str | None = None
) -> tuple[float, list[RequestTiming]]:
    """Every client's requests, one after another; with `system`, each asks its own question under it."""
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def client_loop(index: int) -> list[RequestTiming]:
            timings = []
            for turn in range(requests_per_client):
                if system is None:
                    prompt = f"Write a short poem about {TOPICS[(index + turn) % len(TOPICS)]}. ({index}.{turn})"
                else:
                    prompt = f"{QUESTIONS[(index + turn) % len(QUESTIONS)]} ({index}.{turn})"
                timings.append(await one_request(client, url, prompt, max_tokens, system))
            return timings

        start = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(i) for i in range(clients)))
        return time.perf_counter() - start, [t for timings in per_client for t in timings]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def max_sequences_in_step(url: str) -> int:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("chat_max_sequences_in_step "):
            return int(float(line.split()[1]))
    return 0


def measure(url: str, clients: int, requests_per_client: int, max_tokens: int) -> LevelResult:
    wall, timings = asyncio.run(run_level(url, clients, requests_per_client, max_tokens))
    ttft = [t.ttft_s * 1000 for t in timings]
    itl = [gap * 1000 for t in timings for gap in t.inter_token_s]
    tokens = sum(t.output_tokens for t in timings)
    return LevelResult(
        clients=clients,
        requests=len(timings),
        wall_s=round(wall, 2),
        requests_per_s=round(len(timings) / wall, 3),
        output_tokens_per_s=round(tokens / wall, 1),
        ttft_median_ms=round(statistics.median(ttft), 1),
        ttft_p99_ms=round(percentile(ttft, 0.99), 1),
        itl_median_ms=round(statistics.median(itl), 1),
        itl_p99_ms=round(percentile(itl, 0.99), 1),
        max_sequences_in_step=max_sequences_in_step(url),
    )


def measure_shared_system(url: str, caching: bool, clients: int, requests_per_client: int, max_tokens: int) -> SharedSystemResult:
    wall, timings = asyncio.run(run_level(url, clients, requests_per_client, max_tokens, SHARED_SYSTEM_PROMPT))
    return SharedSystemResult(
        prefix_caching=caching,
        requests=len(timings),
        wall_s=wall,
        requests_per_s=len(timings) / wall,
        output_tokens_per_s=sum(t.output_tokens for t in timings) / wall,
        ttft_median_ms=statistics.median(t.ttft_s for t in timings) * 1000,
        prompt_tokens_median=statistics.median(t.prompt_tokens for t in timings),
        cached_tokens_median=statistics.median(t.cached_tokens for t in timings),
    )


def run_shared_system_case(args: argparse.Namespace) -> dict:
    """The shared-system-prompt case on two servers, caching on and off, in interleaved passes."""
    servers = {}
    try:
        for caching in (True, False):
            servers[caching] = start_server(args.model, [] if caching else ["--no-prefix-caching"])
        for _, url in servers.values():
            asyncio.run(run_level(url, 1, 1, 8))  # warm up (without the shared prompt)
        passes: dict[bool, list[SharedSystemResult]] = {True: [], False: []}
        for p in range(args.shared_system_passes):
            for caching in (True, False) if p % 2 == 0 else (False, True):
                result = measure_shared_system(
                    servers[caching][1], caching, args.shared_system_clients, args.requests_per_client, args.shared_system_max_tokens
                )
                passes[caching].append(result)
                print(f"shared system prompt, pass {p + 1}, caching {'on' if caching else 'off'}: "
                      f"{result.output_tokens_per_s:.1f} tokens/s, TTFT {result.ttft_median_ms:.0f} ms", file=sys.stderr)  # fmt: skip
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)

    def median(caching: bool, field: str) -> float:
        return statistics.median(getattr(r, field) for r in passes[caching])

    throughput_ratio = statistics.median(
        on.output_tokens_per_s / off.output_tokens_per_s for on, off in zip(passes[True], passes[False])
    )
    ttft_ratio = statistics.median(off.ttft_median_ms / on.ttft_median_ms for on, off in zip(passes[True], passes[False]))
    print(f"\nshared ~500-token system prompt, {args.shared_system_clients} clients x {args.requests_per_client} requests, "
          f"{args.shared_system_max_tokens} tokens each (medians of {args.shared_system_passes} passes)")  # fmt: skip
    columns = ["caching", "req/s", "out tok/s", "TTFT p50", "prompt tok", "cached tok"]
    print(" ".join(f"{c:>10}" for c in columns))
    for caching in (True, False):
        cells = [
            "on" if caching else "off",
            f"{median(caching, 'requests_per_s'):.2f}",
            f"{median(caching, 'output_tokens_per_s'):.1f}",
            f"{median(caching, 'ttft_median_ms'):.0f} ms",
            f"{median(caching, 'prompt_tokens_median'):.0f}",
            f"{median(caching, 'cached_tokens_median'):.0f}",
        ]
        print(" ".join(f"{c:>10}" for c in cells))
    print(f"caching on / off: throughput {throughput_ratio:.2f}x (target >= 1.5x), time to first token {ttft_ratio:.1f}x shorter")
    return {
        "clients": args.shared_system_clients,
        "requests_per_client": args.requests_per_client,
        "max_tokens": args.shared_system_max_tokens,
        "passes": {("on" if caching else "off"): [asdict(r) for r in results] for caching, results in passes.items()},
        "throughput_ratio_on_over_off": round(throughput_ratio, 2),
        "ttft_ratio_off_over_on": round(ttft_ratio, 2),
    }


def print_table(results: list[LevelResult]) -> None:
    columns = ["clients", "requests", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "max seqs/step"]
    header = " ".join(f"{c:>9}" for c in columns)
    print(header)
    print("-" * len(header))
    for r in results:
        cells = [
            f"{r.clients}",
            f"{r.requests}",
            f"{r.requests_per_s:.2f}",
            f"{r.output_tokens_per_s:.1f}",
            f"{r.ttft_median_ms:.0f} ms",
            f"{r.ttft_p99_ms:.0f} ms",
            f"{r.itl_median_ms:.0f} ms",
            f"{r.itl_p99_ms:.0f} ms",
            f"{r.max_sequences_in_step}",
        ]
        print(" ".join(f"{c:>9}" for c in cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--url", default=None, help="an already running server for the levels (default: start one)")
    parser.add_argument("--cases", nargs="+", choices=["levels", "shared-system"], default=["levels", "shared-system"])
    parser.add_argument("--shared-system-clients", type=int, default=8)
    parser.add_argument("--shared-system-passes", type=int, default=3)
    parser.add_argument("--shared-system-max-tokens", type=int, default=32)
    parser.add_argument("--output", default=results_path("serving.json"))
    args = parser.parse_args()

    report: dict = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client,
        "cpu_count": os.cpu_count(),
        "torch_threads": _torch_threads(),
    }
    if "levels" in args.cases:
        report.update(run_levels(args))
    if "shared-system" in args.cases:
        report["shared_system_prompt"] = run_shared_system_case(args)
    write_results(args.output, report)
    return 0


def run_levels(args: argparse.Namespace) -> dict:
    process = None
    url = args.url
    if url is None:
        process, url = start_server(args.model, [])
    try:
        asyncio.run(run_level(url, 1, 1, 8))  # warm up: first-call allocations are not what we measure
        results = [measure(url, clients, args.requests_per_client, args.max_tokens) for clients in args.clients]
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)

    print_table(results)
    speedup = results[-1].output_tokens_per_s / results[0].output_tokens_per_s
    print(f"\noutput tokens/s at {results[-1].clients} clients = {speedup:.1f}x that at {results[0].clients} client(s)")
    return {"speedup_last_vs_first": round(speedup, 2), "levels": [asdict(r) for r in results]}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
