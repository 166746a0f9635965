"""Prometheus metrics on a private registry: the engine's counters, read when scraped, and per-request latencies.

`chat_max_sequences_in_step` above 1 is continuous batching at work: one step advanced several
sequences. Engine counts are sequences (a request with n=2 is two).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chat_core import RequestOutput
from chat_core.engine.async_engine import AsyncEngine

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    """The engine's own statistics, read at scrape time so they can never drift from it."""

    def __init__(self, async_engine: AsyncEngine) -> None:
        self.async_engine = async_engine

    def collect(self) -> Iterator[Metric]:
        stats = self.async_engine.stats()
        yield GaugeMetricFamily("chat_sequences_running", "Sequences in the running batch.", stats.num_running)
        yield GaugeMetricFamily("chat_sequences_waiting", "Sequences waiting to be scheduled.", stats.num_waiting)
        yield CounterMetricFamily("chat_prompt_tokens", "Prompt tokens of accepted requests.", stats.prompt_tokens)
        yield CounterMetricFamily("chat_generation_tokens", "Tokens generated.", stats.generation_tokens)
        yield CounterMetricFamily("chat_engine_steps", "Engine steps run.", stats.steps)
        yield CounterMetricFamily(
            "chat_scheduled_sequences", "Sequences advanced, summed over steps (/ steps: the average batch).", stats.scheduled_sequences
        )
        yield GaugeMetricFamily(
            "chat_max_sequences_in_step",
            "The most sequences one engine step has advanced (>1: continuous batching).",
            stats.max_sequences_in_step,
        )
        yield CounterMetricFamily("chat_preemptions", "Sequences preempted for lack of KV cache.", stats.preemptions)
        yield CounterMetricFamily(
            "chat_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries
        )
        yield CounterMetricFamily(
            "chat_prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed again).", stats.prefix_cache_hits
        )
        yield GaugeMetricFamily(
            "chat_prefix_cache_hit_rate", "Prefix cache hits / queries, in tokens, since start.", stats.prefix_cache_hit_rate
        )
        yield CounterMetricFamily(
            "chat_prefix_cache_evictions", "Cached KV blocks whose memory went to other tokens.", stats.prefix_cache_evictions
        )
        yield GaugeMetricFamily("chat_kv_cache_blocks", "KV cache blocks in all.", stats.num_kv_blocks)
        yield GaugeMetricFamily(
            "chat_kv_cache_free_blocks",
            "KV cache blocks no sequence holds (never used, or cached and evictable).",
            stats.num_free_kv_blocks,
        )
        yield GaugeMetricFamily(
            "chat_engine_healthy", "1 while the engine takes requests, 0 once it is dead.", float(self.async_engine.healthy)
        )


class ServerMetrics:
    def __init__(self, async_engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(async_engine))
        self.finished = Counter(
            "chat_requests_finished", "Completions finished, by finish reason.", ["finish_reason"], registry=self.registry
        )
        self.errors = Counter(
            "chat_request_errors", "Requests answered with an error, by status.", ["status"], registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "chat_time_to_first_token_seconds",
            "From arrival to the first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "chat_inter_token_latency_seconds",
            "Between consecutive tokens of a sequence.",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "chat_request_latency_seconds", "From arrival to the last token.", buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        for reason in ("stop", "length", "abort"):
            self.finished.labels(reason)  # present at 0 from the start, so rates work from the first scrape

    content_type = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def track(self, outputs: AsyncIterator[RequestOutput], arrival: float) -> AsyncIterator[RequestOutput]:
        """Pass a request's outputs through, timing its tokens and counting how each completion ended."""
        first_token_at: float | None = None
        last_token_at = arrival
        last_num_tokens = 0
        final: RequestOutput | None = None
        try:
            async with contextlib.aclosing(outputs):  # closing this closes the engine's stream, which aborts it
                async for output in outputs:
                    now = time.perf_counter()
                    num_tokens = max(len(c.token_ids) for c in output.outputs)
                    if num_tokens > last_num_tokens:
                        if first_token_at is None:
                            first_token_at = now
                            self.time_to_first_token.observe(now - arrival)
                        else:  # a step adds at most one token per sequence
                            gap = (now - last_token_at) / (num_tokens - last_num_tokens)
                            for _ in range(num_tokens - last_num_tokens):
                                self.inter_token_latency.observe(gap)
                        last_token_at, last_num_tokens = now, num_tokens
                    final = output
                    yield output
        finally:
            if final is not None and final.finished:
                self.request_latency.observe(last_token_at - arrival)
                for completion in final.outputs:
                    self.finished.labels(completion.finish_reason or "abort").inc()
            elif final is not None:  # left early: the client went away or the engine failed
                for _ in final.outputs:
                    self.finished.labels("abort").inc()
