"""Prometheus metrics of one app, on its own CollectorRegistry, named like SGLang's (`tailorkv:` for `sglang:`).

Token counters, queue gauges and KV pool usage are read from the AsyncEngine at scrape time; the latency
histograms are observed as this app's requests stream.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..engine.async_engine import AsyncEngine, Output

CONTENT_TYPE = CONTENT_TYPE_LATEST
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320, 640)


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def collect(self):
        stats, load = self.engine.stats, self.engine.load()
        for name, doc, value in (
            ("prompt_tokens", "Prompt tokens submitted", stats.prompt_tokens),
            ("generation_tokens", "Tokens generated", stats.generation_tokens),
            (
                "finished_requests",
                "Requests that ran to a stop or their length",
                stats.finished_requests,
            ),
            ("aborted_requests", "Requests aborted by their client", stats.aborted_requests),
            (
                "failed_steps",
                "Engine steps that raised (their running requests failed)",
                stats.failed_steps,
            ),
            (
                "retracted_requests",
                "Decoding requests sent back to the queue when a KV pool ran dry",
                load["num_retracted_reqs"],
            ),
        ):
            yield CounterMetricFamily(f"tailorkv:{name}", doc, value=value)
        yield GaugeMetricFamily(
            "tailorkv:num_running_reqs",
            "Requests in the running batch",
            value=load["num_running_reqs"],
        )
        yield GaugeMetricFamily(
            "tailorkv:num_queue_reqs",
            "Requests waiting for admission",
            value=load["num_queued_reqs"],
        )
        usage = GaugeMetricFamily(
            "tailorkv:kv_usage", "Fraction of the KV pages of a tier in use", labels=["tier"]
        )
        free = GaugeMetricFamily(
            "tailorkv:kv_free_pages", "Free KV pages of a tier", labels=["tier"]
        )
        for tier, u in load["memory"].items():
            usage.add_metric(
                [tier], 1 - u["free_pages"] / u["total_pages"] if u["total_pages"] else 0.0
            )
            free.add_metric([tier], u["free_pages"])
        yield usage
        yield free


class Metrics:
    def __init__(self, engine: AsyncEngine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram(
            "tailorkv:time_to_first_token_seconds",
            "Time to first token",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "tailorkv:inter_token_latency_seconds",
            "Time between two steps of a request",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "tailorkv:e2e_request_latency_seconds",
            "Time from arrival to the last token",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )

    def observe(self, out: Output, previous: float | None) -> None:
        """Record one Output of a request; `previous` is the time of its previous Output (None: first)."""
        if previous is None:
            self.ttft.observe(out.time - out.request.created)
        else:
            self.itl.observe(out.time - previous)
        if out.finished:
            self.e2e.observe(out.time - out.request.created)

    def render(self) -> bytes:
        return generate_latest(self.registry)
