"""Soak a real `chat-cli serve` with many concurrent streaming clients, a quarter of which misbehave.

Clients disconnect before their first token (often while queued: the server runs few sequences at once),
in the middle of a stream, or give up on a whole answer; some ask for n > 1, some for stop strings.
Every answer that completes must equal the same request's answer sent alone (greedy); afterwards the
engine holds no sequence, every KV block is free (or cached and evictable), and the server's resident
memory is within a few percent of what it was after the warm-up.

    python tests/soak/soak_server.py                       # 64 clients, 400 requests on SmolLM2: prints its figures
    python tests/soak/soak_server.py --clients 16 --requests 60 --model tiny

By default the server runs as a user would run it (SmolLM2's Q4 weights kept 4-bit) with --batch-invariant,
which makes "equal to alone" exact. tests/server/test_soak.py runs short versions in CI: the tiny model
(float32, default options) and SmolLM2 with --batch-invariant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "server")]  # tiny_models, server_process

from server_process import read_metrics  # noqa: E402

CHAT = "/v1/chat/completions"
TOPICS = [
    "the sea", "a red fox", "prime numbers", "the moon landing", "bread", "a quiet library", "rain in autumn",
    "the speed of light", "chess openings", "a lighthouse", "volcanoes", "honey bees", "paper airplanes", "glaciers",
    "the printing press", "a violin", "deserts at night", "the number zero", "trains", "coral reefs",
]  # fmt: skip
SYSTEM = "You are a concise assistant. Answer in one or two sentences."  # shared by half the requests: a cached prefix


@dataclass(frozen=True)
class RequestSpec:
    messages: tuple[tuple[str, str], ...]
    max_tokens: int
    n: int
    stop: str | None = None

    def body(self, *, stream: bool) -> dict:
        body = {
            "messages": [{"role": role, "content": content} for role, content in self.messages],
            "max_tokens": self.max_tokens,
            "n": self.n,
            "temperature": 0,
            "stream": stream,
        }
        if self.stop is not None:
            body["stop"] = [self.stop]
        return body


@dataclass(frozen=True)
class Answer:
    texts: tuple[str, ...]  # one per choice
    finish_reasons: tuple[str | None, ...]


@dataclass
class SoakReport:
    requests: int = 0
    kinds: Counter[str] = field(default_factory=Counter)  # of the different requests: "n>1", "stop string"
    outcomes: Counter[str] = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rss_after_warmup: int = 0
    rss_after_soak: int = 0
    sequences_left: tuple[float, float] = (0, 0)  # running, waiting
    kv_blocks_held: float = 0
    seconds: float = 0.0

    @property
    def disconnects(self) -> int:
        return sum(n for outcome, n in self.outcomes.items() if outcome.startswith("disconnected"))

    @property
    def memory_drift(self) -> float:
        return self.rss_after_soak / self.rss_after_warmup - 1 if self.rss_after_warmup else 0.0

    def figures(self) -> str:
        outcomes = ", ".join(f"{name}: {count}" for name, count in sorted(self.outcomes.items()))
        kinds = ", ".join(f"{count} with {kind}" for kind, count in sorted(self.kinds.items()))
        return (
            f"requests: {self.requests} in {self.seconds:.0f} s ({outcomes}); of the different ones {kinds}\n"
            f"disconnects: {self.disconnects}; mismatches: {len(self.mismatches)}; errors: {len(self.errors)}\n"
            f"left after the soak: {self.sequences_left[0]:g} running, {self.sequences_left[1]:g} waiting sequences, "
            f"{self.kv_blocks_held:g} KV blocks held\n"
            f"resident memory: {self.rss_after_warmup / 2**20:.1f} MiB after warm-up, {self.rss_after_soak / 2**20:.1f} MiB "
            f"after the soak: {self.memory_drift:+.2%}"
        )


# The requests


def make_specs(count: int, rng: random.Random, max_tokens: int) -> list[RequestSpec]:
    """`count` different requests: various prompts, lengths and n; stop strings are added once answers are known."""
    specs = []
    for index in range(count):
        topic = TOPICS[index % len(TOPICS)]
        question = f"Tell me about {topic}." if index < len(TOPICS) else f"Tell me about {topic}, part {index // len(TOPICS)}."
        messages = ((("system", SYSTEM),) if index % 2 else ()) + (("user", question),)
        n = rng.choice([1, 1, 1, 2, 3])
        specs.append(RequestSpec(messages, rng.randint(max(2, max_tokens // 4), max_tokens), n))
    return specs


def with_stop_strings(specs: list[RequestSpec], answers: dict[RequestSpec, Answer], rng: random.Random) -> list[RequestSpec]:
    """A fifth of the requests get a stop string taken from the middle of their own answer, so it really stops them."""
    chosen = []
    for spec in specs:
        text = answers[spec].texts[0]
        if rng.random() < 0.2 and len(text.strip()) >= 8:
            start = rng.randrange(2, len(text) - 4)
            stop = text[start : start + rng.randint(1, 3)]
            if stop.strip():
                spec = RequestSpec(spec.messages, spec.max_tokens, spec.n, stop)
        chosen.append(spec)
    return chosen


# One client's request, behaving or not


async def whole_answer(client: httpx.AsyncClient, spec: RequestSpec) -> Answer:
    response = await client.post(CHAT, json=spec.body(stream=False))
    response.raise_for_status()
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    return Answer(tuple(c["message"]["content"] for c in choices), tuple(c["finish_reason"] for c in choices))


async def streamed_answer(response: httpx.Response, n: int, close_after: int | None = None) -> Answer | None:
    """The streamed answer, or None once `close_after` content chunks were read (then the caller closes it)."""
    texts, reasons, chunks = [""] * n, [None] * n, 0
    async for line in response.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: ") :])
        if "error" in event:
            raise RuntimeError(f"an error event: {event['error']}")
        for choice in event["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
            reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
            chunks += bool(choice["delta"].get("content"))
        if close_after is not None and chunks >= close_after:
            return None
    return Answer(tuple(texts), tuple(reasons))


async def one_request(client: httpx.AsyncClient, spec: RequestSpec, behaviour: str, rng: random.Random) -> tuple[str, Answer | None]:
    """(what happened, the answer if it completed)."""
    if behaviour == "whole":
        return "completed-whole", await whole_answer(client, spec)
    if behaviour == "give-up-whole":  # a non-streaming client that stops waiting
        task = asyncio.ensure_future(whole_answer(client, spec))
        done, _ = await asyncio.wait({task}, timeout=rng.uniform(0.0, 0.3))
        if done:
            return "completed-before-giving-up", task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        return "disconnected-waiting-whole", None
    request = client.build_request("POST", CHAT, json=spec.body(stream=True))
    if behaviour == "leave-before-first-token":
        # The server sends the headers with the first token: leaving before them is leaving while queued or in prefill.
        task = asyncio.ensure_future(client.send(request, stream=True))
        done, _ = await asyncio.wait({task}, timeout=rng.uniform(0.0, 0.05))
        if not done:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            return "disconnected-before-first-token", None
        response = task.result()
        await response.aclose()
        return "disconnected-at-first-token", None
    response = await client.send(request, stream=True)
    try:
        response.raise_for_status()
        close_after = rng.randint(1, max(1, spec.max_tokens - 1)) if behaviour == "leave-mid-stream" else None
        answer = await streamed_answer(response, spec.n, close_after)
    finally:
        await response.aclose()
    if answer is None:
        return "disconnected-mid-stream", None
    return ("completed-before-leaving" if behaviour == "leave-mid-stream" else "completed-stream"), answer


def behaviours(count: int, rng: random.Random) -> list[str]:
    """A quarter misbehave: leave before the first token, mid-stream, or give up on a whole answer."""
    bad = ["leave-before-first-token", "leave-mid-stream", "give-up-whole"]
    return [rng.choice(bad) if rng.random() < 0.25 else rng.choice(["stream", "stream", "whole"]) for _ in range(count)]


async def run_clients(
    url: str, plan: list[tuple[RequestSpec, str]], clients: int, seed: int, expected: dict[RequestSpec, Answer], report: SoakReport
) -> None:
    queue: asyncio.Queue[tuple[int, RequestSpec, str]] = asyncio.Queue()
    for index, (spec, behaviour) in enumerate(plan):
        queue.put_nowait((index, spec, behaviour))
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker(worker_index: int) -> None:
            rng = random.Random(seed * 1000 + worker_index)
            while not queue.empty():
                index, spec, behaviour = queue.get_nowait()
                report.requests += 1
                try:
                    outcome, answer = await one_request(client, spec, behaviour, rng)
                except Exception as exc:  # noqa: BLE001 - every failure is a finding, reported with its request
                    report.errors.append(f"request {index} ({behaviour}): {type(exc).__name__}: {exc}")
                    continue
                report.outcomes[outcome] += 1
                if answer is not None and answer != expected[spec]:
                    report.mismatches.append(f"request {index} {spec}: got {answer}, alone {expected[spec]}")

        await asyncio.gather(*(worker(i) for i in range(clients)))


# The whole soak


def wait_until_idle(url: str, report: SoakReport, timeout: float = 60) -> None:
    """Aborts land at the engine's next turn: wait for no sequence and no KV block held, then record what is left."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = read_metrics(url)
        report.sequences_left = (metrics["chat_sequences_running"], metrics["chat_sequences_waiting"])
        report.kv_blocks_held = metrics["chat_kv_cache_blocks"] - metrics["chat_kv_cache_free_blocks"]
        if report.sequences_left == (0, 0) and report.kv_blocks_held == 0 or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def resident_memory(pid: int) -> int:
    """The server's resident memory, its rank processes included."""
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def run_soak(url: str, pid: int, *, clients: int, requests: int, distinct: int, max_tokens: int, seed: int) -> SoakReport:
    rng = random.Random(seed)
    report = SoakReport()
    started = time.perf_counter()

    async def alone(specs: list[RequestSpec]) -> dict[RequestSpec, Answer]:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            return {spec: await whole_answer(client, spec) for spec in specs}  # one at a time: each answered alone

    specs = make_specs(distinct, rng, max_tokens)
    specs = with_stop_strings(specs, asyncio.run(alone(specs)), rng)
    expected = asyncio.run(alone(specs))
    report.kinds.update({"n>1": sum(s.n > 1 for s in specs), "a stop string": sum(s.stop is not None for s in specs)})
    # Warm-up: every request once, all clients at once, everyone behaving (and checked like the soak).
    warmup = SoakReport()
    asyncio.run(run_clients(url, [(spec, "stream") for spec in specs], clients, seed + 1, expected, warmup))
    report.mismatches += [f"warm-up: {m}" for m in warmup.mismatches]
    report.errors += [f"warm-up: {e}" for e in warmup.errors]
    wait_until_idle(url, report)
    report.rss_after_warmup = resident_memory(pid)
    plan = list(zip((rng.choice(specs) for _ in range(requests)), behaviours(requests, rng)))
    asyncio.run(run_clients(url, plan, clients, seed + 2, expected, report))
    wait_until_idle(url, report)
    report.rss_after_soak = resident_memory(pid)
    report.seconds = time.perf_counter() - started
    return report


@contextlib.contextmanager
def soak_server(model: str, log_dir: str, *extra: str) -> Iterator:
    from server_process import start_server, stop_server

    server = start_server("--model", model, *extra, log_dir=log_dir, env={"CHAT_API_KEY": ""})
    try:
        yield server
    finally:
        stop_server(server.process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--distinct", type=int, default=48, help="different requests among them (default: 48)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model, or 'tiny' for a tiny random one made here")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="sequences the server runs at once; the rest queue")
    parser.add_argument("--kv-cache-memory", default="0.5", help="GiB of KV cache (small: the warm-up fills it all)")
    parser.add_argument("--quantize", default="auto", help="the server's --quantize (default: auto, SmolLM2's Q4 weights kept 4-bit)")
    parser.add_argument(
        "--batch-invariant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the server's --batch-invariant (default: on; without it a batched answer can differ from the one alone "
        "in the last bits of its logits, and so now and then in a greedy token)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chat-soak-") as work:
        model = args.model
        if model == "tiny":
            from tiny_models import add_tiny_tokenizer, make_tiny_checkpoint

            model = os.path.join(work, "tiny-chat")
            make_tiny_checkpoint(model, "mistral", seed=3)
            add_tiny_tokenizer(model)
        server_args = ("--max-num-seqs", str(args.max_num_seqs), "--kv-cache-memory", args.kv_cache_memory, "--quantize", args.quantize)
        if args.batch_invariant:
            server_args += ("--batch-invariant",)
        with soak_server(model, work, *server_args) as server:
            report = run_soak(
                server.url,
                server.process.pid,
                clients=args.clients,
                requests=args.requests,
                distinct=args.distinct,
                max_tokens=args.max_tokens,
                seed=args.seed,
            )
            log = server.log()
    invariant = " --batch-invariant" if args.batch_invariant else ""
    print(f"soak of {args.model} (--quantize {args.quantize}{invariant}): {args.clients} clients, --max-num-seqs {args.max_num_seqs}")
    print(report.figures())
    for line in (report.mismatches + report.errors)[:20]:
        print("- " + line[:500])
    problems = [line for line in log.splitlines() if "Traceback" in line or "ERROR" in line]
    for line in problems[:10]:
        print("server log: " + line)
    ok = not report.mismatches and not report.errors and not problems and report.kv_blocks_held == 0
    return 0 if ok and report.sequences_left == (0, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
