"""Prometheus metrics for /metrics, named like vLLM's (`quantkit:` for `vllm:`) so its dashboards port.

Engine state (running/waiting, KV blocks, prefix cache, preemptions) is read from the engine's last step
snapshot at scrape time; per-request histograms and token counters are fed as requests end. Each server gets
its own registry, so several servers in one process (the tests) never share a counter.
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from quantkit.engine.async_engine import AsyncLLMEngine, FinishedRequest

CONTENT_TYPE = CONTENT_TYPE_LATEST

# vLLM's buckets: TTFT from 1 ms, TPOT from 10 ms, end-to-end from 0.3 s.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats
        gauges = [
            ("quantkit:num_requests_running", "Sequences in the running batch.", s.num_running),
            ("quantkit:num_requests_waiting", "Sequences waiting to be scheduled (preempted ones included).",
             s.num_waiting),
            ("quantkit:kv_cache_usage_perc", "Fraction of KV blocks held by requests (1 = full).", s.kv_usage),
            ("quantkit:kv_cache_free_blocks", "KV blocks not held by any request (cached-but-free included).",
             s.num_free_blocks),
            ("quantkit:kv_cache_total_blocks", "KV blocks in the pool.", s.num_blocks),
            ("quantkit:prefix_cache_hit_rate", "Prompt tokens served by the prefix cache / tokens looked up.",
             s.prefix_cache_hit_rate),
            ("quantkit:num_requests_in_flight", "Requests accepted by the server and not yet finished.",
             self.engine.num_in_flight),
        ]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        counters = [
            ("quantkit:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            ("quantkit:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
            ("quantkit:num_preemptions", "Preemptions (recompute) of running sequences.", s.num_preemptions),
        ]
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family


class ServerMetrics:
    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineCollector(engine, model_name))
        labels = ["model_name"]
        self.ttft = Histogram("quantkit:time_to_first_token_seconds", "Time to first token.", labels,
                              registry=self.registry, buckets=_TTFT_BUCKETS)
        self.tpot = Histogram("quantkit:time_per_output_token_seconds", "Mean time per output token after the "
                              "first.", labels, registry=self.registry, buckets=_TPOT_BUCKETS)
        self.e2e = Histogram("quantkit:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             registry=self.registry, buckets=_E2E_BUCKETS)
        self.prompt_tokens = Counter("quantkit:prompt_tokens", "Prompt tokens of finished requests.", labels,
                                     registry=self.registry)
        self.generation_tokens = Counter("quantkit:generation_tokens", "Generated tokens of finished requests.",
                                         labels, registry=self.registry)
        self.finished = Counter("quantkit:request_success", "Finished completions by finish reason.",
                                labels + ["finished_reason"], registry=self.registry)

    def record(self, req: FinishedRequest) -> None:
        """Called by the async engine on the event loop for every request that ends."""
        name = self.model_name
        self.prompt_tokens.labels(name).inc(req.num_prompt_tokens)
        self.generation_tokens.labels(name).inc(req.num_output_tokens)
        for reason in req.finish_reasons:
            self.finished.labels(name, reason).inc()
        if "abort" in req.finish_reasons:
            return  # an aborted request's latency says when its client left, not how fast the server is
        self.e2e.labels(name).observe(req.e2e_s)
        if req.ttft_s is not None:
            self.ttft.labels(name).observe(req.ttft_s)
        if req.tpot_s is not None:
            self.tpot.labels(name).observe(req.tpot_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
