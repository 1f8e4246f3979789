"""Load test of the generator over gRPC in the style of `vllm bench serve`: TTFT, TPOT, ITL, E2E, throughput.

    python -m benchmarks.serve_bench --address 127.0.0.1:50052 --num-requests 200 --request-rate 8
    python -m benchmarks.serve_bench --model .cache/models/bench    # launches both services (make bench-serve)

Each prompt is one image placeholder per image, then random words of common/assets/corpus.txt (`--input-len`
counts words, about one token each with the demo tokenizer); the output is forced to `--output-len` tokens with
`ignore_eos`. Images are the `--images` files or seeded random PNGs; `--repeat-image-share` of the requests
with an image reuse one image (embedding-cache and prefix-cache hits). The same seed gives the same requests.

Metrics as vLLM defines them: TTFT = first token - send; ITL = gaps between messages carrying tokens;
TPOT = (E2E - TTFT) / (output tokens - 1); throughputs over the wall time of the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import random
import shlex
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from importlib.resources import files
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from benchmarks.serve_launch import LaunchError, launch_services
from common.client import IMAGE_PLACEHOLDER, AsyncMMServeClient, default_address
from protos import generator_pb2

REPO = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}


@dataclass(frozen=True)
class BenchConfig:
    num_requests: int = 64
    request_rate: float = math.inf  # requests/s, Poisson arrivals; inf = all at once
    max_concurrency: int | None = None  # requests in flight at most (None = unbounded)
    image_share: float = 1.0  # fraction of requests with one image
    repeat_image_share: float = 0.0  # fraction of the image requests that reuse one shared image
    images: tuple[str, ...] = ()  # image files or directories; empty = random PNGs
    image_size: int = 224  # side of the random PNGs
    input_len: tuple[int, int] = (32, 32)  # prompt words, uniform in [lo, hi]
    output_len: tuple[int, int] = (32, 32)  # generated tokens, uniform in [lo, hi]
    temperature: float = 0.0
    seed: int = 0
    timeout_s: float | None = None  # deadline of each request
    warmup: bool = True  # one untimed request first (its own image, so the measured images stay uncached)

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError("--num-requests must be >= 1")
        if not self.request_rate > 0:
            raise ValueError("--request-rate must be > 0 (inf = all at once)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be >= 1")
        for name, share in (("--image-share", self.image_share), ("--repeat-image-share", self.repeat_image_share)):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} {share}: use a fraction in [0, 1]")
        for name, (lo, hi), least in (("--input-len", self.input_len, 0), ("--output-len", self.output_len, 1)):
            if not least <= lo <= hi:
                raise ValueError(f"{name} {lo}:{hi}: use N or LO:HI with {least} <= LO <= HI")


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    images: tuple[bytes, ...]
    max_tokens: int
    prompt_words: int


def random_png(seed: str, size: int) -> bytes:
    """A noise image: PNG-compresses badly, like a photo, and is distinct per seed."""
    pixels = random.Random(seed).randbytes(size * size * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_files(paths: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for path in map(Path, paths):
        found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if paths and not found:
        raise ValueError(f"--images {' '.join(paths)}: no {'/'.join(sorted(IMAGE_SUFFIXES))} files")
    return found


def build_requests(config: BenchConfig, placeholder: str = IMAGE_PLACEHOLDER) -> list[BenchRequest]:
    """Exactly round(n * image_share) requests carry an image; round(that * repeat_image_share) of them share
    image 0, the others get images 1, 2, ... (0, 1, ... when none is shared): random PNGs, or the files in turn."""
    rng = random.Random(config.seed)
    n = config.num_requests
    with_image = set(rng.sample(range(n), round(n * config.image_share)))
    reused = set(rng.sample(sorted(with_image), round(len(with_image) * config.repeat_image_share)))
    image_files = _image_files(config.images)
    words = files("common").joinpath("assets", "corpus.txt").read_text().split()

    def image(number: int) -> bytes:
        if image_files:
            return image_files[number % len(image_files)].read_bytes()
        return random_png(f"mmserve-bench:{config.seed}:{number}", config.image_size)

    shared = image(0) if reused else b""
    requests, unique = [], 1 if reused else 0
    for index in range(n):
        images: tuple[bytes, ...] = ()
        if index in reused:
            images = (shared,)
        elif index in with_image:
            images = (image(unique),)
            unique += 1
        num_words = rng.randint(*config.input_len)
        text = " ".join(rng.choices(words, k=num_words))
        prompt = f"{placeholder}\n" * len(images) + text
        requests.append(BenchRequest(prompt, images, rng.randint(*config.output_len), num_words))
    return requests


@dataclass
class RequestResult:
    index: int
    num_images: int
    prompt_words: int
    max_tokens: int
    start_s: float = 0.0  # when it was sent, from the start of the run
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    finish_reason: str = ""
    error: str | None = None  # gRPC status name, e.g. RESOURCE_EXHAUSTED
    error_details: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.e2e_s is None or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def _stats_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    if not values_s:
        return {"mean": None, "median": None, "p99": None}
    ms = np.asarray(values_s) * 1000.0
    return {"mean": float(ms.mean()), "median": float(np.median(ms)), "p99": float(np.percentile(ms, 99))}


@dataclass
class BenchmarkResult:
    config: BenchConfig
    requests: list[RequestResult]
    duration_s: float

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.requests if r.error is None]
        output_tokens = sum(r.output_tokens for r in ok)
        return {
            "completed": len(ok),
            "failed": len(self.requests) - len(ok),
            "errors_by_status": dict(Counter(r.error for r in self.requests if r.error is not None)),
            "duration_s": self.duration_s,
            "total_input_tokens": sum(r.prompt_tokens for r in ok),
            "total_output_tokens": output_tokens,
            "cached_prompt_tokens": sum(r.cached_prompt_tokens for r in ok),
            "request_throughput": len(ok) / self.duration_s,
            "output_throughput": output_tokens / self.duration_s,
            "ttft_ms": _stats_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
            "tpot_ms": _stats_ms([t for r in ok if (t := r.tpot_s) is not None]),
            "itl_ms": _stats_ms([gap for r in ok for gap in r.itl_s]),
            "e2e_ms": _stats_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
        }

    def to_json(self) -> dict[str, Any]:
        config = asdict(self.config) | {"request_rate": str(self.config.request_rate)}  # JSON has no Infinity
        return {"config": config, "summary": self.summary(), "requests": [asdict(r) for r in self.requests]}


async def _send(
    client: AsyncMMServeClient, index: int, request: BenchRequest, config: BenchConfig, run_id: str, run_start: float
) -> RequestResult:
    result = RequestResult(index, len(request.images), request.prompt_words, request.max_tokens)
    sent = last = time.perf_counter()
    result.start_s = sent - run_start
    stream = client.generate(
        request.prompt,
        images=request.images,
        request_id=f"bench-{run_id}-{index}",
        max_tokens=request.max_tokens,
        ignore_eos=True,
        temperature=config.temperature,
        timeout_s=config.timeout_s,
    )
    try:
        async for message in stream:
            now = time.perf_counter()
            if message.token_ids:
                if result.ttft_s is None:
                    result.ttft_s = now - sent
                else:
                    result.itl_s.append(now - last)
                last = now
                result.output_tokens += len(message.token_ids)
            if message.HasField("usage"):
                result.prompt_tokens = message.usage.prompt_tokens
                result.cached_prompt_tokens = message.usage.cached_prompt_tokens
            if message.finish_reason:
                result.finish_reason = generator_pb2.FinishReason.Name(message.finish_reason)
        result.e2e_s = time.perf_counter() - sent
    except grpc.aio.AioRpcError as exc:
        result.error, result.error_details = exc.code().name, exc.details() or ""
    return result


async def run_requests(
    client: AsyncMMServeClient, requests: Sequence[BenchRequest], config: BenchConfig
) -> BenchmarkResult:
    """Sends `requests` with Poisson arrivals at `request_rate` (all at once if inf), at most `max_concurrency`
    in flight; TTFT and E2E start when a request is sent, after any wait for a concurrency slot."""
    limiter = asyncio.Semaphore(config.max_concurrency or len(requests))
    arrivals = random.Random(config.seed + 1)
    run_id, start = uuid.uuid4().hex[:8], time.perf_counter()

    async def limited(index: int, request: BenchRequest) -> RequestResult:
        async with limiter:
            return await _send(client, index, request, config, run_id, start)

    tasks = []
    for index, request in enumerate(requests):
        if index and math.isfinite(config.request_rate):
            await asyncio.sleep(arrivals.expovariate(config.request_rate))
        tasks.append(asyncio.create_task(limited(index, request)))
    results = list(await asyncio.gather(*tasks))
    return BenchmarkResult(config, results, time.perf_counter() - start)


async def run_benchmark_async(address: str, config: BenchConfig) -> BenchmarkResult:
    async with AsyncMMServeClient(address) as client:
        info = await client.model_info("generator", timeout_s=30.0)
        placeholder = info.image_placeholder or IMAGE_PLACEHOLDER
        requests = build_requests(config, placeholder)
        if config.warmup:  # like vLLM's initial test run: fail fast, and leave connection set-up out of the figures
            images = (
                [random_png(f"mmserve-bench-warmup:{config.seed}", config.image_size)] if config.image_share else []
            )
            await client.generate_text(f"{placeholder}\n" * len(images) + "Warm up.", images=images, max_tokens=2)
        return await run_requests(client, requests, config)


def run_benchmark(address: str, config: BenchConfig) -> BenchmarkResult:
    """Runs the whole benchmark against the generator at `address`; raises grpc.RpcError when the model info
    or the warm-up request fails (failures of the measured requests are counted in the result instead)."""
    return asyncio.run(run_benchmark_async(address, config))


def format_report(result: BenchmarkResult) -> str:
    s = result.summary()
    lines = [" Serving Benchmark Result ".center(50, "=")]
    rows: list[tuple[str, Any]] = [
        ("Successful requests:", s["completed"]),
        ("Failed requests:", s["failed"]),
        ("Benchmark duration (s):", s["duration_s"]),
        ("Total input tokens:", s["total_input_tokens"]),
        ("Cached prompt tokens:", s["cached_prompt_tokens"]),
        ("Total generated tokens:", s["total_output_tokens"]),
        ("Request throughput (req/s):", s["request_throughput"]),
        ("Output token throughput (tok/s):", s["output_throughput"]),
    ]
    lines += [f"{name:<40}{value:.2f}" if isinstance(value, float) else f"{name:<40}{value}" for name, value in rows]
    for key, title, short in (
        ("ttft_ms", "Time to First Token", "TTFT"),
        ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
        ("itl_ms", "Inter-token Latency", "ITL"),
        ("e2e_ms", "End-to-end Latency", "E2EL"),
    ):
        lines.append(title.center(50, "-"))
        for stat, value in s[key].items():
            shown = "n/a" if value is None else f"{value:.2f}"
            lines.append(f"{f'{stat.capitalize()} {short} (ms):':<40}{shown}")
    if s["errors_by_status"]:
        lines.append("Errors by status: " + ", ".join(f"{k}={v}" for k, v in sorted(s["errors_by_status"].items())))
    lines.append("=" * 50)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _length_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(  # dests named like the BenchConfig fields
        prog="python -m benchmarks.serve_bench",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="With --model and no --address, both services are launched locally (--launch is implied).",
    )
    add = parser.add_argument
    add("--address", help="generator HOST:PORT [default: $MMSERVE_GENERATOR_ADDRESS or 127.0.0.1:50052]")
    add("--model", help="checkpoint for --launch")
    add("--launch", action="store_true", help="start both services on free loopback ports, stop them at the end")
    add("--encoder-args", default="", help="extra encoder flags: --encoder-args='--max-batch-size 8'")
    add("--generator-args", default="", help="extra generator flags: --generator-args='--max-num-seqs 32'")
    add("--ready-timeout", type=float, default=600.0, help="seconds the launched services get to report SERVING")
    add("--num-requests", type=int, default=64)
    add("--request-rate", type=float, default=math.inf, help="requests/s, Poisson arrivals (default inf: all at once)")
    add("--max-concurrency", type=int, help="requests in flight at most")
    add("--image-share", type=float, default=1.0, help="fraction of requests with an image [default: 1]")
    add("--repeat-image-share", type=float, default=0.0, help="fraction of image requests reusing one image")
    add("--images", nargs="+", default=[], metavar="DIR|FILE", help="image files to send (default: random PNGs)")
    add("--image-size", type=int, default=224, help="side of the random PNGs in pixels")
    add("--input-len", type=_length_range, default=(32, 32), metavar="N|LO:HI", help="prompt words [default: 32]")
    add("--output-len", type=_length_range, default=(32, 32), metavar="N|LO:HI", help="output tokens [default: 32]")
    add("--temperature", type=float, default=0.0, help="[default: 0 = greedy]")
    add("--seed", type=int, default=0)
    add("--timeout", type=float, dest="timeout_s", metavar="S", help="deadline of each request in seconds")
    add("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up request")
    add("--json", metavar="OUT", help="write the config, summary and per-request results as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    launch = args.launch or (args.model is not None and args.address is None)
    if launch and (args.model is None or args.address is not None):
        parser.error("--launch needs --model and no --address")
    try:
        config = BenchConfig(
            **{f.name: getattr(args, f.name) for f in fields(BenchConfig)} | {"images": tuple(args.images)}
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        with contextlib.ExitStack() as stack:
            address = args.address or default_address("generator")
            if launch:
                launched = launch_services(
                    args.model,
                    encoder_args=shlex.split(args.encoder_args),
                    generator_args=shlex.split(args.generator_args),
                    ready_timeout_s=args.ready_timeout,
                )
                address = stack.enter_context(launched).generator_address
            result = run_benchmark(address, config)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"error: {address}: {exc.code().name}: {exc.details()} (before the measured requests)", file=sys.stderr)
        return 1
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return 0 if result.summary()["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
