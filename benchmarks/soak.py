"""Soak test: both services as real subprocesses under a steady open-loop load for N minutes, checking for leaks.

    python -m benchmarks.soak --minutes 10                       # builds a tiny llava checkpoint, private Redis
    python -m benchmarks.soak --model .cache/models/demo-llava-tiny --minutes 1 --rate 2 --json-out soak.json

Requests start on a fixed schedule (`--rate` per second) whether or not earlier ones finished; one that finds
`--max-in-flight` requests still running is not sent and counts as `dropped`. Each carries one image: a fresh
random PNG (`--new-image-fraction`, an embedding-cache miss) or one of a small pool (a hit), and
`--cancel-fraction` of them are cancelled by the client at a random point of the stream (before the first
token, or after k of the tokens). RSS of both services and the generator's KV gauges are sampled every
`--sample-interval` seconds. At the end, once the generator is idle, both are stopped with SIGTERM.

Exit status 1 (with the reasons on stderr) when, for either service, RSS grew by more than `--max-rss-growth-mb`
from the end of the warm-up (`--warmup-s`, default the first 20% of the run) to the end; when KV blocks are
still in use with no request in flight; when any request failed other than by the client's own cancel; or
when a service did not exit 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import math
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.serve_bench import random_png
from benchmarks.serve_launch import REPO, LaunchError, launch_services, private_redis
from common.client import IMAGE_PLACEHOLDER, AsyncMMServeClient

MB = 1024 * 1024
# Client-side outcomes that are not failures; anything else is a gRPC status name (an error).
OK, CANCELLED, DROPPED = "ok", "cancelled", "dropped"
# Server-side statuses that are not failures: the client's own cancels show up as CANCELLED there.
SERVER_OK_STATUSES = frozenset({"OK", "CANCELLED"})
# The generator's in-process LRU would never fill at its default 512 MiB, and a cache still filling looks like a
# leak. 4 MiB (~1000 tiny 16x64 float32 embeddings) fills within a 10-minute run at the default load, so eviction
# runs too and the memory plateaus; what it costs shows in the growth (~5 MB of the 100 MB allowed).
DEFAULT_GENERATOR_ARGS = "--local-cache-bytes 4194304"

# {"name{label=value,...}": value}: one scrape of a /metrics endpoint.
Snapshot = dict[str, float]


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 600.0
    rate: float = 4.0  # requests started per second, on a fixed schedule
    max_in_flight: int = 32  # a request due while this many run is dropped (open loop, bounded concurrency)
    cancel_fraction: float = 0.1
    new_image_fraction: float = 0.5
    image_pool_size: int = 8  # the repeated images
    image_size: int = 64  # side of the random PNGs
    prompt_words: int = 16
    max_tokens: int = 16  # tokens per request (ignore_eos: always this many unless cancelled)
    warmup_s: float | None = None  # None = the first 20% of the run
    sample_interval_s: float = 5.0
    max_rss_growth_mb: float = 100.0
    request_timeout_s: float = 60.0
    idle_timeout_s: float = 30.0  # how long the generator gets to go idle after the last request
    seed: int = 0

    def __post_init__(self) -> None:
        for name, fraction in (
            ("--cancel-fraction", self.cancel_fraction),
            ("--new-image-fraction", self.new_image_fraction),
        ):
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"{name} {fraction}: use a fraction in [0, 1]")
        for name, value in (
            ("--minutes", self.duration_s),
            ("--rate", self.rate),
            ("--sample-interval", self.sample_interval_s),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} {value}: use a positive number")
        if self.max_in_flight < 1 or self.image_pool_size < 1 or self.max_tokens < 1:
            raise ValueError("--max-in-flight, --image-pool-size and --max-tokens must be >= 1")
        if self.warmup_s is not None and not 0 <= self.warmup_s < self.duration_s:
            raise ValueError(f"--warmup-s {self.warmup_s}: use 0 <= it < the run's {self.duration_s:g} s")

    @property
    def warmup_end_s(self) -> float:
        return 0.2 * self.duration_s if self.warmup_s is None else self.warmup_s


@dataclass(frozen=True)
class Targets:
    """What the load runs against: the generator's gRPC address, both /metrics URLs, and the pids to sample."""

    generator_address: str
    generator_metrics_url: str
    encoder_metrics_url: str
    pids: Mapping[str, int]  # "encoder" / "generator" -> pid


@dataclass(frozen=True)
class RequestPlan:
    prompt: str
    image: bytes
    new_image: bool
    cancel_after_tokens: int | None  # None = read to the end; 0 = cancel before the first token
    cancel_delay_s: float  # with cancel_after_tokens == 0: cancel this long after sending


@dataclass
class RequestOutcome:
    start_s: float
    status: str = OK  # OK, CANCELLED, DROPPED or a gRPC status name
    new_image: bool = False
    tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None


@dataclass
class Sample:
    t_s: float  # from the start of the load
    rss_bytes: dict[str, int]
    kv_blocks_used: float | None
    requests_in_flight: float | None


@dataclass
class SoakResult:
    config: SoakConfig
    load_duration_s: float
    outcomes: list[RequestOutcome]
    samples: list[Sample]
    generator_metrics: Snapshot  # final scrape, after the generator went idle
    encoder_metrics: Snapshot
    exit_codes: dict[str, int] = field(default_factory=dict)  # filled in after SIGTERM


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def rss_bytes(pid: int) -> int:
    """Resident set size of a process: /proc/PID/status VmRSS on Linux, else psutil (when installed)."""
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # "VmRSS:   123456 kB"
        raise RuntimeError(f"no VmRSS in {status} (a zombie process?)")
    psutil = importlib.import_module("psutil")  # ModuleNotFoundError says what to install
    return int(psutil.Process(pid).memory_info().rss)


def _sample_key(name: str, labels: Mapping[str, str]) -> str:
    return name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}" if labels else "")


def parse_metrics(text: str) -> Snapshot:
    return {
        _sample_key(sample.name, sample.labels): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(url: str, timeout_s: float = 5.0) -> Snapshot:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return parse_metrics(response.read().decode())


def by_label(snapshot: Snapshot, name: str, label: str) -> dict[str, float]:
    """{label value: sample value} of one labelled metric, e.g. requests by status."""
    prefix = name + "{"
    found: dict[str, float] = {}
    for key, value in snapshot.items():
        if key.startswith(prefix):
            labels = dict(part.split("=", 1) for part in key[len(prefix) : -1].split(","))
            if label in labels:
                found[labels[label]] = found.get(labels[label], 0.0) + value
    return found


# ---------------------------------------------------------------------------------------------------------------
# Load


class RequestPlanner:
    """The seeded stream of requests: which image (pool or fresh), the prompt words, where to cancel."""

    def __init__(self, config: SoakConfig, placeholder: str) -> None:
        self._config, self._placeholder = config, placeholder
        self._rng = random.Random(config.seed)
        self._words = files("common").joinpath("assets", "corpus.txt").read_text().split()
        self._pool = [
            random_png(f"mmserve-soak-pool:{config.seed}:{i}", config.image_size) for i in range(config.image_pool_size)
        ]
        self._count = 0

    def next(self) -> RequestPlan:
        config, rng = self._config, self._rng
        self._count += 1
        new_image = rng.random() < config.new_image_fraction
        if new_image:
            image = random_png(f"mmserve-soak-new:{config.seed}:{self._count}", config.image_size)
        else:
            image = rng.choice(self._pool)
        cancel_after = rng.randrange(config.max_tokens) if rng.random() < config.cancel_fraction else None
        text = " ".join(rng.choices(self._words, k=config.prompt_words))
        return RequestPlan(f"{self._placeholder}\n{text}", image, new_image, cancel_after, rng.uniform(0.0, 0.1))


async def send(client: AsyncMMServeClient, plan: RequestPlan, outcome: RequestOutcome, config: SoakConfig) -> None:
    """Streams one request into `outcome`; a planned cancel closes the stream (the RPC is cancelled)."""
    sent = time.perf_counter()
    outcome.new_image = plan.new_image
    stream = client.generate(
        plan.prompt,
        images=[plan.image],
        max_tokens=config.max_tokens,
        ignore_eos=True,
        timeout_s=config.request_timeout_s,
    )
    # Cancel before the first token: a deadline of our own, shorter than a prefill under load.
    deadline = plan.cancel_delay_s if plan.cancel_after_tokens == 0 else None
    try:
        async with contextlib.aclosing(stream), asyncio.timeout(deadline):
            async for message in stream:
                if not message.token_ids:
                    continue
                if outcome.ttft_s is None:
                    outcome.ttft_s = time.perf_counter() - sent
                outcome.tokens += len(message.token_ids)
                if plan.cancel_after_tokens is not None and outcome.tokens >= plan.cancel_after_tokens:
                    outcome.status = CANCELLED
                    return
        outcome.e2e_s = time.perf_counter() - sent
    except TimeoutError:
        outcome.status = CANCELLED
    except grpc.aio.AioRpcError as exc:
        outcome.status = exc.code().name


async def _sample(targets: Targets, t_s: float) -> Sample:
    rss = {}
    for service, pid in targets.pids.items():
        with contextlib.suppress(OSError):  # exited: a gap in its series; its exit status fails the run
            rss[service] = rss_bytes(pid)
    try:
        metrics = await asyncio.to_thread(scrape, targets.generator_metrics_url)
    except OSError:  # a missed scrape is a gap in the series, not a failed soak
        metrics = {}
    return Sample(t_s, rss, metrics.get("mmserve_kv_blocks_used"), metrics.get("mmserve_requests_in_flight"))


async def _sample_every(targets: Targets, interval_s: float, start: float, samples: list[Sample]) -> None:
    while True:
        await asyncio.sleep(interval_s)
        samples.append(await _sample(targets, time.perf_counter() - start))


async def wait_idle(metrics_url: str, timeout_s: float) -> Snapshot:
    """Scrapes the generator until nothing is in flight, queued or holding a KV block, or `timeout_s` passes;
    returns the last scrape either way (the leak check reads it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        snapshot = await asyncio.to_thread(scrape, metrics_url)
        busy = (
            "mmserve_requests_in_flight",
            "mmserve_requests_running",
            "mmserve_requests_waiting",
            "mmserve_kv_blocks_used",
        )
        if all(snapshot.get(name, 0.0) == 0 for name in busy) or time.monotonic() > deadline:
            return snapshot
        await asyncio.sleep(0.2)


async def run_load(targets: Targets, config: SoakConfig) -> SoakResult:
    """Runs the load for `config.duration_s`, drains it, waits for the generator to go idle and scrapes both
    services; raises grpc.RpcError if the generator does not answer GetModelInfo."""
    outcomes: list[RequestOutcome] = []
    in_flight: set[asyncio.Task[None]] = set()
    async with AsyncMMServeClient(targets.generator_address) as client:
        info = await client.model_info("generator", timeout_s=30.0)
        planner = RequestPlanner(config, info.image_placeholder or IMAGE_PLACEHOLDER)
        start = time.perf_counter()
        samples = [await _sample(targets, 0.0)]
        sampler = asyncio.create_task(_sample_every(targets, config.sample_interval_s, start, samples))
        for index in range(math.ceil(config.duration_s * config.rate)):
            await asyncio.sleep(max(0.0, start + index / config.rate - time.perf_counter()))
            outcome = RequestOutcome(start_s=time.perf_counter() - start)
            outcomes.append(outcome)
            if len(in_flight) >= config.max_in_flight:
                outcome.status = DROPPED
                continue
            task = asyncio.create_task(send(client, planner.next(), outcome, config))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:  # every request has its own deadline: this returns
            await asyncio.wait(in_flight)
        load_duration_s = time.perf_counter() - start
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        generator_metrics = await wait_idle(targets.generator_metrics_url, config.idle_timeout_s)
        samples.append(await _sample(targets, time.perf_counter() - start))  # idle: the end of the RSS series
        encoder_metrics = await asyncio.to_thread(scrape, targets.encoder_metrics_url)
    return SoakResult(config, load_duration_s, outcomes, samples, generator_metrics, encoder_metrics)


# ---------------------------------------------------------------------------------------------------------------
# Checks: each returns the failures it found, as sentences


@dataclass(frozen=True)
class RssFigures:
    start_mb: float  # before the load
    after_warmup_mb: float  # mean of the first samples after the warm-up
    end_mb: float  # mean of the last samples (the last one taken idle)
    peak_mb: float

    @property
    def growth_mb(self) -> float:
        return self.end_mb - self.after_warmup_mb


def rss_figures(samples: Sequence[Sample], warmup_end_s: float, window: int = 3) -> dict[str, RssFigures]:
    """Per service; means over `window` samples so one allocator spike is not read as growth. Services with no
    sample after the warm-up are left out (the RSS check reports them)."""
    figures = {}
    for service in samples[0].rss_bytes if samples else ():
        series = [(s.t_s, s.rss_bytes[service] / MB) for s in samples if service in s.rss_bytes]
        after = [mb for t, mb in series if t >= warmup_end_s]
        if after:
            figures[service] = RssFigures(
                series[0][1],
                statistics.fmean(after[:window]),
                statistics.fmean(after[-window:]),
                max(mb for _, mb in series),
            )
    return figures


def check_rss_growth(figures: Mapping[str, RssFigures], services: Sequence[str], limit_mb: float) -> list[str]:
    failures = [
        f"{service}: no RSS sample after the warm-up (run longer)" for service in services if service not in figures
    ]
    for service, rss in figures.items():
        if rss.growth_mb > limit_mb:
            failures.append(
                f"{service}: RSS grew {rss.growth_mb:.1f} MB after the warm-up "
                f"({rss.after_warmup_mb:.1f} -> {rss.end_mb:.1f} MB), over the {limit_mb:g} MB limit"
            )
    return failures


def check_leaked_blocks(generator: Snapshot) -> list[str]:
    """The generator, scraped once idle, must hold no KV block and no request."""
    if "mmserve_kv_blocks_used" not in generator:
        return ["generator metrics have no mmserve_kv_blocks_used: cannot check for leaked KV blocks"]
    failures = []
    if (used := generator["mmserve_kv_blocks_used"]) != 0:
        failures.append(f"generator: {used:g} KV blocks still in use when idle (leaked)")
    for name in ("mmserve_requests_in_flight", "mmserve_requests_running", "mmserve_requests_waiting"):
        if (count := generator.get(name, 0.0)) != 0:
            failures.append(f"generator: {name} is {count:g} after the load ended (a stuck request)")
    return failures


def check_errors(client_counts: Mapping[str, int], generator: Snapshot, encoder: Snapshot) -> list[str]:
    """Any request that ended other than OK or by the client's own cancel, seen by the client or a service."""
    failures = [
        f"client: {n} request(s) ended {status}"
        for status, n in client_counts.items()
        if status not in (OK, CANCELLED, DROPPED)
    ]
    for service, statuses in (
        ("generator", by_label(generator, "mmserve_requests_total", "status")),
        ("encoder", by_label(encoder, "mmserve_encoder_requests_total", "code")),
    ):
        failures += [
            f"{service}: {n:g} call(s) ended {status}"
            for status, n in statuses.items()
            if status not in SERVER_OK_STATUSES and n
        ]
    return failures


def check_exit_codes(exit_codes: Mapping[str, int]) -> list[str]:
    return [
        f"{service}: exit status {code} after SIGTERM (want 0)" for service, code in exit_codes.items() if code != 0
    ]


def failures(result: SoakResult) -> list[str]:
    config = result.config
    counts = Counter(o.status for o in result.outcomes)
    services = list(result.samples[0].rss_bytes) if result.samples else []
    return (
        check_rss_growth(rss_figures(result.samples, config.warmup_end_s), services, config.max_rss_growth_mb)
        + check_leaked_blocks(result.generator_metrics)
        + check_errors(counts, result.generator_metrics, result.encoder_metrics)
        + check_exit_codes(result.exit_codes)
    )


# ---------------------------------------------------------------------------------------------------------------
# Report


def _percentiles_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    if not values_s:
        return {"p50": None, "p90": None, "p99": None}
    ms = np.asarray(values_s) * 1000.0
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)}


def _ratio(hits: float, total: float) -> float | None:
    return hits / total if total else None


def summary(result: SoakResult) -> dict[str, Any]:
    generator, encoder = result.generator_metrics, result.encoder_metrics
    lookups = by_label(generator, "mmserve_image_lookups_total", "source")  # local | redis | encoder
    encoder_hits, encoder_misses = (encoder.get(f"mmserve_encoder_cache_{k}_total", 0.0) for k in ("hits", "misses"))
    ok = [o for o in result.outcomes if o.status == OK]
    return {
        "load_duration_s": result.load_duration_s,
        "requests_scheduled": len(result.outcomes),
        "client_status_counts": dict(Counter(o.status for o in result.outcomes)),
        "generator_status_counts": by_label(generator, "mmserve_requests_total", "status"),
        "encoder_status_counts": by_label(encoder, "mmserve_encoder_requests_total", "code"),
        "new_image_requests": sum(o.new_image for o in result.outcomes if o.status != DROPPED),
        "generator_image_lookups": lookups,
        "generator_cache_hit_ratio": _ratio(
            lookups.get("local", 0.0) + lookups.get("redis", 0.0), sum(lookups.values())
        ),
        "encoder_cache_hit_ratio": _ratio(encoder_hits, encoder_hits + encoder_misses),
        "cache_errors": {
            "generator": by_label(generator, "mmserve_generator_cache_errors_total", "op"),
            "encoder": by_label(encoder, "mmserve_encoder_cache_errors_total", "op"),
        },
        "ttft_ms": _percentiles_ms([o.ttft_s for o in ok if o.ttft_s is not None]),
        "e2e_ms": _percentiles_ms([o.e2e_s for o in ok if o.e2e_s is not None]),
        "kv_blocks_used_idle": generator.get("mmserve_kv_blocks_used"),
        "kv_blocks_total": generator.get("mmserve_kv_blocks_total"),
        "rss_mb": {
            s: asdict(f) | {"growth_mb": f.growth_mb}
            for s, f in rss_figures(result.samples, result.config.warmup_end_s).items()
        },
        "exit_codes": result.exit_codes,
    }


def format_report(result: SoakResult, problems: Sequence[str]) -> str:
    s = summary(result)
    config = result.config

    def pct(values: Mapping[str, float | None]) -> str:
        return " / ".join("n/a" if v is None else f"{v:.0f}" for v in values.values())

    def ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    lines = [
        " Soak Result ".center(60, "="),
        f"load: {s['load_duration_s']:.0f} s at {config.rate:g} req/s (warm-up {config.warmup_end_s:.0f} s), "
        f"cancel {config.cancel_fraction:g}, new images {config.new_image_fraction:g}",
        f"client outcomes:    {_counts(s['client_status_counts'])}",
        f"generator statuses: {_counts(s['generator_status_counts'])}",
        f"encoder statuses:   {_counts(s['encoder_status_counts'])}",
        f"image lookups:      {_counts(s['generator_image_lookups'])}; generator hit ratio "
        f"{ratio(s['generator_cache_hit_ratio'])}, encoder hit ratio {ratio(s['encoder_cache_hit_ratio'])}",
        f"TTFT p50/p90/p99 ms: {pct(s['ttft_ms'])};  E2E p50/p90/p99 ms: {pct(s['e2e_ms'])}",
        f"KV blocks in use when idle: {s['kv_blocks_used_idle']} of {s['kv_blocks_total']}",
    ]
    for service, rss in s["rss_mb"].items():
        lines.append(
            f"RSS {service:<9} start {rss['start_mb']:.1f}  after warm-up {rss['after_warmup_mb']:.1f}  "
            f"end {rss['end_mb']:.1f}  peak {rss['peak_mb']:.1f} MB  growth {rss['growth_mb']:+.1f} MB"
        )
    if s["exit_codes"]:
        lines.append(f"exit codes after SIGTERM: {_counts(s['exit_codes'])}")
    if any(s["cache_errors"].values()):
        lines.append(f"cache errors (requests went on without the cache): {s['cache_errors']}")
    if dropped := s["client_status_counts"].get(DROPPED):
        lines.append(f"warning: {dropped} requests dropped at --max-in-flight {config.max_in_flight}: lower --rate")
    lines += ["PASS" if not problems else "FAIL", *(f"  - {p}" for p in problems), "=" * 60]
    return "\n".join(lines)


def _counts(counts: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(counts.items())) or "none"


# ---------------------------------------------------------------------------------------------------------------
# Command line


@contextlib.contextmanager
def _checkpoint(model: str | None) -> Iterator[str]:
    """`model`, or a tiny llava checkpoint built into a temporary directory."""
    if model is not None:
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="mmserve-soak-") as directory:
        argv = [sys.executable, "-m", "common.demo_model", directory, "--family", "llava", "--size", "tiny"]
        subprocess.run(argv, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        yield directory


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    add = parser.add_argument
    d = SoakConfig()
    add("--model", help="checkpoint for both services [default: build a tiny llava one in a temporary directory]")
    add("--minutes", type=float, default=d.duration_s / 60, help="length of the load [default: %(default)g]")
    add("--rate", type=float, default=d.rate, help="requests started per second [default: %(default)g]")
    add(
        "--max-in-flight", type=int, default=d.max_in_flight, help="bound on concurrent requests [default: %(default)d]"
    )
    add(
        "--cancel-fraction",
        type=float,
        default=d.cancel_fraction,
        help="requests the client cancels [default: %(default)g]",
    )
    add(
        "--new-image-fraction",
        type=float,
        default=d.new_image_fraction,
        help="requests with a fresh image [default: %(default)g]",
    )
    add("--image-pool-size", type=int, default=d.image_pool_size, help="repeated images [default: %(default)d]")
    add("--image-size", type=int, default=d.image_size, help="side of the random PNGs [default: %(default)d]")
    add("--max-tokens", type=int, default=d.max_tokens, help="tokens per request [default: %(default)d]")
    add("--warmup-s", type=float, help="seconds excluded from the RSS growth [default: 20%% of the run]")
    add(
        "--sample-interval",
        type=float,
        default=d.sample_interval_s,
        help="seconds between RSS samples [default: %(default)g]",
    )
    add(
        "--max-rss-growth-mb",
        type=float,
        default=d.max_rss_growth_mb,
        help="RSS growth that fails the run [default: %(default)g]",
    )
    add("--seed", type=int, default=d.seed)
    add("--redis-url", help="Redis for both services [default: a private redis-server on a free port]")
    add("--encoder-args", default="", help="extra encoder flags, e.g. --encoder-args='--max-batch-size 8'")
    add("--generator-args", default=DEFAULT_GENERATOR_ARGS, help="extra generator flags [default: '%(default)s']")
    add("--ready-timeout", type=float, default=600.0, help="seconds the services get to report SERVING")
    add("--json-out", metavar="PATH", help="write the config, summary, failures and RSS samples as JSON")
    return parser


def _run(args: argparse.Namespace, config: SoakConfig) -> SoakResult:
    with contextlib.ExitStack() as stack:
        redis_url = args.redis_url or stack.enter_context(private_redis())
        model = stack.enter_context(_checkpoint(args.model))
        cache = ["--redis-url", redis_url]
        services = stack.enter_context(
            launch_services(
                model,
                encoder_args=[*cache, *shlex.split(args.encoder_args)],
                generator_args=[*cache, *shlex.split(args.generator_args)],
                ready_timeout_s=args.ready_timeout,
                metrics=True,
            )
        )
        targets = Targets(
            services.generator_address,
            f"http://127.0.0.1:{services.generator_metrics_port}/metrics",
            f"http://127.0.0.1:{services.encoder_metrics_port}/metrics",
            {"encoder": services.processes[0].pid, "generator": services.processes[1].pid},
        )
        result = asyncio.run(run_load(targets, config))
        result.exit_codes = services.stop()
        for service, code in result.exit_codes.items():
            if code != 0:
                print(f"{service} output:\n{services.output_tail(service)}", file=sys.stderr)
        return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = SoakConfig(
            duration_s=args.minutes * 60,
            rate=args.rate,
            max_in_flight=args.max_in_flight,
            cancel_fraction=args.cancel_fraction,
            new_image_fraction=args.new_image_fraction,
            image_pool_size=args.image_pool_size,
            image_size=args.image_size,
            max_tokens=args.max_tokens,
            warmup_s=args.warmup_s,
            sample_interval_s=args.sample_interval,
            max_rss_growth_mb=args.max_rss_growth_mb,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        result = _run(args, config)
    except (LaunchError, subprocess.CalledProcessError, OSError) as exc:  # OSError: a /metrics scrape failed
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"error: the generator did not answer: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    problems = failures(result)
    print(format_report(result, problems))
    if args.json_out:
        report = {
            "config": asdict(config),
            "summary": summary(result),
            "failures": problems,
            "samples": [asdict(sample) for sample in result.samples],
        }
        Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
