"""benchmarks.soak: its core loop for a few seconds against both servers in-process (real gRPC, real Redis,
real /metrics over HTTP), and its pass/fail checks on hand-made snapshots, so a leak would fail the soak."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.serve_launch import private_redis
from benchmarks.soak import (
    CANCELLED,
    OK,
    RequestPlanner,
    Sample,
    SoakConfig,
    Targets,
    by_label,
    check_errors,
    check_exit_codes,
    check_leaked_blocks,
    check_rss_growth,
    failures,
    parse_metrics,
    rss_bytes,
    rss_figures,
    run_load,
)
from common.config import CacheConfig, EncoderConfig, ModelConfig, ServerConfig
from tests.generator_service.support import EventLoopThread, RunningEncoder, RunningGenerator, generator_config

MB = 1024 * 1024
IDLE = {
    "mmserve_kv_blocks_used": 0.0,
    "mmserve_kv_blocks_total": 256.0,
    "mmserve_requests_in_flight": 0.0,
    "mmserve_requests_running": 0.0,
    "mmserve_requests_waiting": 0.0,
}


@pytest.fixture
def services(tiny_checkpoint: Path) -> Iterator[Targets]:
    """Encoder + generator in this process, sharing a private redis-server, each with a /metrics port."""
    loop = EventLoopThread()
    with private_redis() as redis_url:
        cache = CacheConfig(redis_url=redis_url, redis_timeout_ms=200.0)
        encoder_config = EncoderConfig(
            model=ModelConfig(model=str(tiny_checkpoint)),
            server=ServerConfig(port=0, metrics_port=0, shutdown_grace_s=2.0),
            cache=cache,
        )
        encoder = RunningEncoder(loop, encoder_config)
        generator = RunningGenerator(
            loop,
            generator_config(tiny_checkpoint, encoder_address=encoder.address, redis_url=redis_url, metrics_port=0),
        )
        try:
            yield Targets(
                generator.address,
                f"http://127.0.0.1:{generator.server.metrics_port}/metrics",
                f"http://127.0.0.1:{encoder.server.metrics_port}/metrics",
                {"encoder": os.getpid(), "generator": os.getpid()},
            )
        finally:
            generator.stop()
            encoder.stop()
            loop.close()


def test_soak_loop_runs_cancels_and_mixes_images_then_passes_its_checks(services: Targets) -> None:
    config = SoakConfig(
        duration_s=3.0,
        rate=5.0,
        cancel_fraction=0.3,
        new_image_fraction=0.5,
        image_pool_size=2,
        max_tokens=8,
        warmup_s=1.0,
        sample_interval_s=0.5,
        request_timeout_s=20.0,
        idle_timeout_s=10.0,
    )
    result = asyncio.run(asyncio.wait_for(run_load(services, config), 60))

    # The same seed replays the same plan: every planned cancel is a client cancel, the rest complete.
    planner = RequestPlanner(config, "<image>")
    plans = [planner.next() for _ in range(15)]
    planned_cancels = sum(plan.cancel_after_tokens is not None for plan in plans)
    assert 0 < planned_cancels < 15
    assert Counter(o.status for o in result.outcomes) == {OK: 15 - planned_cancels, CANCELLED: planned_cancels}
    assert all(o.tokens == 8 for o in result.outcomes if o.status == OK)

    # Both cache outcomes happened: fresh images went to the encoder, pool images were found locally.
    # (A request cancelled while its image is looked up may leave no lookup: counts are bounds, not exact.)
    assert 0 < sum(plan.new_image for plan in plans) < 15
    lookups = by_label(result.generator_metrics, "mmserve_image_lookups_total", "source")
    assert lookups.get("encoder", 0) > 0 and lookups.get("local", 0) + lookups.get("redis", 0) > 0
    assert sum(lookups.values()) <= 15
    # The generator saw the requests (one cancelled at once may never reach it) and ended idle: its gauges
    # are what the leak check reads.
    server_total = sum(by_label(result.generator_metrics, "mmserve_requests_total", "status").values())
    assert 15 - planned_cancels <= server_total <= 15
    assert check_leaked_blocks(result.generator_metrics) == []

    # RSS was sampled through the run, after the warm-up too, and the whole verdict is a pass.
    assert len(result.samples) >= 5 and result.samples[-1].t_s >= result.load_duration_s  # the last one idle
    assert all(s.kv_blocks_used is not None for s in result.samples)
    assert set(rss_figures(result.samples, config.warmup_end_s)) == {"encoder", "generator"}
    assert failures(result) == []


def test_leak_check_flags_blocks_or_requests_held_when_idle() -> None:
    assert check_leaked_blocks(IDLE) == []
    assert check_leaked_blocks(IDLE | {"mmserve_kv_blocks_used": 3.0}) == [
        "generator: 3 KV blocks still in use when idle (leaked)"
    ]
    stuck = check_leaked_blocks(IDLE | {"mmserve_requests_in_flight": 1.0})
    assert stuck == ["generator: mmserve_requests_in_flight is 1 after the load ended (a stuck request)"]
    assert "cannot check" in check_leaked_blocks({})[0]  # no gauge is a failure, not a pass


def _samples(*points: tuple[float, float]) -> list[Sample]:
    return [Sample(t, {"generator": int(mb * MB)}, 0.0, 0.0) for t, mb in points]


def test_rss_check_measures_growth_after_the_warm_up_only() -> None:
    # Model loading and first batches before the warm-up end (t=10) do not count; steady after it passes.
    warm = _samples((0, 100), (5, 400), (10, 450), (15, 452), (20, 455), (25, 451), (30, 453), (35, 452))
    figures = rss_figures(warm, warmup_end_s=10)
    assert figures["generator"].start_mb == 100 and figures["generator"].peak_mb == 455
    assert check_rss_growth(figures, ["generator"], limit_mb=100) == []
    # A leak: +150 MB between the first and the last samples after the warm-up.
    leak = _samples((0, 100), (10, 450), (15, 450), (20, 450), (25, 520), (30, 600), (35, 600), (40, 600))
    figures = rss_figures(leak, warmup_end_s=10)
    assert figures["generator"].growth_mb == pytest.approx(150)
    assert check_rss_growth(figures, ["generator"], limit_mb=100) == [
        "generator: RSS grew 150.0 MB after the warm-up (450.0 -> 600.0 MB), over the 100 MB limit"
    ]
    # A run too short to have a sample after the warm-up cannot pass.
    short = rss_figures(_samples((0, 100), (5, 120)), warmup_end_s=10)
    assert check_rss_growth(short, ["generator"], limit_mb=100) == [
        "generator: no RSS sample after the warm-up (run longer)"
    ]


def test_error_check_passes_cancels_and_flags_every_other_failure() -> None:
    generator = parse_metrics(
        'mmserve_requests_total{status="OK"} 90.0\n'
        'mmserve_requests_total{status="CANCELLED"} 10.0\n'
        'mmserve_requests_total{status="INTERNAL"} 1.0\n'
    )
    encoder = parse_metrics('mmserve_encoder_requests_total{code="OK"} 50.0\n')
    assert by_label(generator, "mmserve_requests_total", "status") == {"OK": 90, "CANCELLED": 10, "INTERNAL": 1}
    client = {"ok": 89, "cancelled": 10, "dropped": 2, "UNAVAILABLE": 1}
    assert check_errors(client, generator, encoder) == [
        "client: 1 request(s) ended UNAVAILABLE",
        "generator: 1 call(s) ended INTERNAL",
    ]
    assert check_errors({"ok": 3, "cancelled": 1}, {}, encoder) == []


def test_exit_check_wants_zero_after_sigterm() -> None:
    assert check_exit_codes({"encoder": 0, "generator": 0}) == []
    assert check_exit_codes({"encoder": 0, "generator": -9}) == ["generator: exit status -9 after SIGTERM (want 0)"]


def test_rss_sees_memory_a_process_holds() -> None:
    before = rss_bytes(os.getpid())
    held = b"\x01" * (200 * MB)  # written, so resident
    assert rss_bytes(os.getpid()) - before >= 150 * MB
    del held
