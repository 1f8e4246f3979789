"""Prometheus metrics of one generator server, in a registry of its own (two servers in one process never clash).

Engine gauges and totals are read from the engine's latest `EngineStats` snapshot at scrape time, so they are
always consistent with each other and cost the engine loop nothing. Request outcomes, latencies and image
lookups are recorded by the servicer and the image resolver as they happen.

    mmserve_kv_blocks_total / _used               KV-cache blocks in the pool / held by live requests
    mmserve_requests_running / _waiting           the engine's running batch / admission queue
    mmserve_prefix_cache_hit_tokens_total         prompt tokens served from the KV prefix cache
    mmserve_preemptions_total                     recompute preemptions
    mmserve_requests_total{status}                finished Generate calls by gRPC status name (OK, CANCELLED, ...)
    mmserve_requests_in_flight                    Generate calls admitted and not yet finished
    mmserve_time_to_first_token_seconds           arrival (before image resolution) -> first token sent
    mmserve_inter_token_latency_seconds           between consecutive streamed tokens
    mmserve_request_duration_seconds              arrival -> last message
    mmserve_generated_tokens_total                completion tokens streamed
    mmserve_image_lookups_total{source}           where each image's embedding came from: local, redis, encoder
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from generator_service.engine.llm_engine import EngineStats

# Seconds: sub-millisecond CPU decode steps up to multi-second queued prefills.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    """Exposes the engine's latest stats snapshot (taken by the engine thread after every step)."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily("mmserve_kv_blocks_total", "KV-cache blocks in the pool", value=stats.kv_blocks_total)
        yield GaugeMetricFamily(
            "mmserve_kv_blocks_used", "KV-cache blocks held by live requests", value=stats.kv_blocks_used
        )
        yield GaugeMetricFamily(
            "mmserve_requests_running", "Requests in the engine's running batch", value=stats.requests_running
        )
        yield GaugeMetricFamily(
            "mmserve_requests_waiting", "Requests queued in the engine", value=stats.requests_waiting
        )
        yield CounterMetricFamily(
            "mmserve_prefix_cache_hit_tokens",
            "Prompt tokens served from the KV prefix cache",
            value=stats.prefix_cache_hit_tokens_total,
        )
        yield CounterMetricFamily(
            "mmserve_preemptions",
            "Requests preempted (recomputed) for lack of KV blocks",
            value=stats.preemptions_total,
        )


class GeneratorMetrics:
    """All metrics of one generator server; `registry` is what its /metrics endpoint serves."""

    def __init__(self, engine_stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(engine_stats))
        self.requests_total = Counter(
            "mmserve_requests", "Finished Generate calls by gRPC status", ["status"], registry=self.registry
        )
        self.requests_in_flight = Gauge(
            "mmserve_requests_in_flight", "Generate calls admitted and not finished", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "mmserve_time_to_first_token_seconds",
            "Request arrival to first streamed token",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "mmserve_inter_token_latency_seconds",
            "Time between consecutive streamed tokens",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "mmserve_request_duration_seconds",
            "Request arrival to last message",
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "mmserve_generated_tokens", "Completion tokens streamed", registry=self.registry
        )
        self.image_lookups = Counter(
            "mmserve_image_lookups",
            "Image embeddings by where they were found: local, redis or encoder",
            ["source"],
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "mmserve_generator_cache_errors",
            "Redis calls of the generator that failed or timed out (requests went on without the cache)",
            ["op"],
            registry=self.registry,
        )
        self.encoder_errors = Counter(
            "mmserve_encoder_call_errors",
            "Encode / GetModelInfo calls to the encoder service that failed, by gRPC status",
            ["status"],
            registry=self.registry,
        )

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when absent); for tests and the demo."""
        found = self.registry.get_sample_value(name, labels or {})
        return 0.0 if found is None else found
