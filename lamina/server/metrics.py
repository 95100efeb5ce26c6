"""Prometheus metrics for /metrics, named like vLLM's (`lamina:` instead of `vllm:`) so its
Grafana dashboards and `vllm bench`-style scrapers need only a prefix change.

Engine gauges and counters are read at scrape time from the snapshot the engine thread writes
after each step (no locks on the hot path); latency histograms are observed by the engine thread
as tokens come out. Each app gets its own registry so several servers can live in one process
(the tests do that).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lamina.server.async_engine import AsyncEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 300)


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        snap = self.engine.snapshot
        labels = ["model_name"]
        value = [self.model_name]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"lamina:{name}", doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"lamina:{name}", doc, labels=labels)
            c.add_metric(value, v)
            return c

        yield gauge("num_requests_running", "Requests in the running batch.", snap.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", snap.num_waiting)
        usage = snap.kv_blocks_used / snap.kv_blocks_total if snap.kv_blocks_total else 0.0
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", usage)
        yield gauge("kv_cache_blocks_used", "KV-cache blocks in use.", snap.kv_blocks_used)
        yield gauge("kv_cache_blocks_total", "KV-cache blocks in all.", snap.kv_blocks_total)
        yield counter(
            "generation_tokens", "Generated tokens (all samples).", snap.generation_tokens
        )
        yield counter(
            "prompt_tokens_computed",
            "Prompt tokens prefilled (prefix-cache hits excluded).",
            snap.prompt_tokens_computed,
        )
        yield counter(
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            snap.prefix_cache_queries,
        )
        yield counter(
            "prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            snap.prefix_cache_hits,
        )
        yield counter("num_preemptions", "Sequences preempted.", snap.num_preemptions)
        yield counter(
            "spec_decode_num_drafts",
            "Sequence-steps that verified speculated tokens.",
            snap.spec_drafts,
        )
        yield counter(
            "spec_decode_num_draft_tokens", "Speculated tokens verified.", snap.spec_draft_tokens
        )
        yield counter(
            "spec_decode_num_accepted_tokens",
            "Speculated tokens kept (the target sampled them).",
            snap.spec_accepted_tokens,
        )
        for name, doc, counts in (
            ("accepted", "kept", snap.spec_accepted_at),
            ("draft", "verified", snap.spec_proposed_at),
        ):
            per = CounterMetricFamily(
                f"lamina:spec_decode_num_{name}_tokens_per_pos",
                f"Speculated tokens {doc}, by position in the guess.",
                labels=[*labels, "position"],
            )
            for pos in range(len(snap.spec_proposed_at)):
                per.add_metric([*value, str(pos)], counts[pos] if pos < len(counts) else 0)
            yield per


class ServerMetrics:
    """The registry behind /metrics; also the AsyncEngine's RequestObserver."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        # no `*_created` series (process-wide; vLLM does the same); prometheus_client leaves
        # this function unannotated
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        r = self.registry
        labels = ["model_name"]
        self.prompt_tokens = Counter(
            "lamina:prompt_tokens", "Prompt tokens of admitted requests.", labels, registry=r
        ).labels(model_name)
        self._requests = Counter(
            "lamina:request_success",
            "Finished requests by finish reason.",
            [*labels, "finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "lamina:time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.itl = Histogram(
            "lamina:inter_token_latency_seconds",
            "Time between successive outputs of a request.",
            labels,
            buckets=_ITL_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.e2e = Histogram(
            "lamina:e2e_request_latency_seconds",
            "Time from arrival to the last token of finished requests.",
            labels,
            buckets=_E2E_BUCKETS,
            registry=r,
        ).labels(model_name)

    def attach(self, engine: AsyncEngine) -> None:
        """Export the engine's gauges and counters (read from its snapshot at scrape time)."""
        self.registry.register(_EngineCollector(engine, self.model_name))

    # ---- RequestObserver (called on the engine thread; prometheus_client is thread-safe) ----
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, seconds: float | None, reason: str) -> None:
        self._requests.labels(self.model_name, reason).inc()
        if seconds is not None:
            self.e2e.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
