"""Prometheus metrics of one encoder server, in a registry of its own (two servers in one process never collide).

Contract names (DESIGN.md): `mmserve_encoder_cache_hits_total`, `mmserve_encoder_cache_misses_total`,
`mmserve_encoder_cache_errors_total`. The rest are ours:

    mmserve_encoder_cache_coalesced_total     requests that joined an in-flight encode of the same image
    mmserve_encoder_cache_poisoned_total      Redis records that failed verification (then deleted)
    mmserve_encoder_images_encoded_total      images that went through the vision tower
    mmserve_encoder_encode_seconds            one batched forward pass (vision tower + projector)
    mmserve_encoder_batch_size                images per forward pass
    mmserve_encoder_request_seconds           one Encode call, end to end
    mmserve_encoder_requests_total{code}      Encode calls by gRPC status code
    mmserve_encoder_cache_breaker_open        1 while Redis is being skipped
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class EncoderMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.cache_hits = Counter("mmserve_encoder_cache_hits", "Images served from the embedding cache", registry=r)
        self.cache_misses = Counter("mmserve_encoder_cache_misses", "Images not in the cache (encoded)", registry=r)
        self.cache_errors = Counter(
            "mmserve_encoder_cache_errors", "Failed or timed-out cache calls", ["op"], registry=r
        )
        self.cache_coalesced = Counter(
            "mmserve_encoder_cache_coalesced", "Images that joined an in-flight encode of the same key", registry=r
        )
        self.cache_poisoned = Counter(
            "mmserve_encoder_cache_poisoned", "Cache records that failed verification and were deleted", registry=r
        )
        self.images_encoded = Counter(
            "mmserve_encoder_images_encoded", "Images run through the vision tower", registry=r
        )
        self.encode_seconds = Histogram(
            "mmserve_encoder_encode_seconds", "Seconds per batched forward pass", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "mmserve_encoder_batch_size", "Images per forward pass", buckets=_BATCH_BUCKETS, registry=r
        )
        self.request_seconds = Histogram(
            "mmserve_encoder_request_seconds", "Seconds per Encode call", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.requests = Counter("mmserve_encoder_requests", "Encode calls by status code", ["code"], registry=r)
        self.breaker_open = Gauge(
            "mmserve_encoder_cache_breaker_open", "1 while the Redis circuit breaker skips Redis", registry=r
        )

    def record_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.encode_seconds.observe(seconds)
        self.images_encoded.inc(size)

    def record_lookup(self, source: str) -> None:
        """An image found: a cache hit unless the encoder made it (misses are counted when the cache misses)."""
        if source != "encoder":
            self.cache_hits.inc()

    def record_cache_error(self, op: str) -> None:
        self.cache_errors.labels(op=op).inc()

    def watch_breaker(self, is_open: Callable[[], bool]) -> None:
        """Report the breaker state at scrape time (no background task needed)."""
        self.breaker_open.set_function(lambda: 1.0 if is_open() else 0.0)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when absent); for tests and the benchmark."""
        found = self.registry.get_sample_value(name, labels or {})
        return 0.0 if found is None else found

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
