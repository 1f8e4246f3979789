"""Encoder service benchmark: `make bench-encoder` (= `python -m benchmarks.encoder_bench --model .cache/models/bench`).

Starts three `python -m encoder_service` child processes on free loopback ports (in-process LRU; the same with
`--max-batch-size 1`; `--redis-url`) and drives them over gRPC from this process with fresh 640x480 JPEGs (every
timed encode is a cache miss unless it is meant to be a hit):

    encode latency, batch 1     one client, one image per call, median over calls
    images/s                    1 client one image at a time, then 8 and 32 concurrent clients (dynamic batching),
                                and 8 clients without batching; plus images per pass and server-side forward time
    cache hit vs miss           the same image encoded twice: first call (miss) vs second (hit), Redis and local

Every figure is the median over --repeats runs, the figures' runs interleaved so that load from elsewhere on the
machine hits them alike (its load average is printed too). Prints a Markdown section for BENCHMARKS.md.

Compute floor (benchmarks/floor.py): the FLOPs of encoding one bench image (vision tower + projector, counted by
FlopCounterMode in this process) over this machine's fp32 matmul peak, measured here before and after the runs
(the better of the two). Each images/s figure and the server-side time per image show the share of it they reach.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from benchmarks.floor import VisionFlops, compute_floor_seconds, measure_matmul_peak
from common.config import ModelConfig
from common.images.cache import redacted_url
from common.images.vision_encoder import VisionEncoder
from protos import encoder_pb2, encoder_pb2_grpc

REPO = Path(__file__).resolve().parents[1]


class ImagePool:
    """Distinct JPEG files (smooth gradients plus noise, like photos compress), generated on demand."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)

    def take(self, count: int) -> list[bytes]:
        return [self._one() for _ in range(count)]

    def _one(self) -> bytes:
        y, x = np.mgrid[0:480, 0:640]
        base = np.stack([x * self._rng.uniform(0.1, 0.4), y * self._rng.uniform(0.1, 0.5), (x + y) * 0.2], -1)
        pixels = np.clip(base + self._rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        return buffer.getvalue()


@dataclass
class EncoderProcess:
    address: str
    metrics_url: str
    process: subprocess.Popen[bytes]

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return 0.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def launch_encoder(model: str, extra: list[str], timeout_s: float = 300) -> Iterator[EncoderProcess]:
    port, metrics_port = _free_port(), _free_port()
    command = [sys.executable, "-m", "encoder_service", "--model", model, "--port", str(port),
               "--metrics-port", str(metrics_port), *extra]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        child = EncoderProcess(f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", process)
        try:
            try:
                _wait_serving(child, timeout_s)
            except RuntimeError as exc:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-3000:]
                raise RuntimeError(f"{exc}; its output:\n{tail}") from None
            yield child
        finally:
            process.terminate()
            process.wait(timeout=60)


def _wait_serving(child: EncoderProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(child.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise RuntimeError(f"encoder exited with status {child.process.returncode} before serving")
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.2)
    raise RuntimeError(f"encoder not SERVING after {timeout_s:.0f} s")


async def _encode(stub: encoder_pb2_grpc.EncoderStub, data: bytes) -> tuple[float, encoder_pb2.EncodedImage]:
    request = encoder_pb2.EncodeRequest(images=[encoder_pb2.ImageInput(data=data)], return_embeddings=True)
    started = time.perf_counter()
    response = await stub.Encode(request, timeout=600)
    return time.perf_counter() - started, response.images[0]


async def _throughput(stub: encoder_pb2_grpc.EncoderStub, images: list[bytes], clients: int) -> float:
    """images/s with `clients` concurrent callers, each sending one image per call, back to back."""
    queue = list(reversed(images))

    async def client() -> None:
        while queue:
            await _encode(stub, queue.pop())

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return len(images) / (time.perf_counter() - started)


async def _latencies(
    stub: encoder_pb2_grpc.EncoderStub, images: list[bytes]
) -> tuple[list[float], list[float], list[str]]:
    """(miss seconds, hit seconds, keys) for each image encoded twice in a row."""
    misses, hits, keys = [], [], []
    for data in images:
        miss, first = await _encode(stub, data)
        hit, second = await _encode(stub, data)
        if first.cache_hit or not second.cache_hit:
            raise RuntimeError("expected a miss then a hit: is the cache disabled or the image reused?")
        misses.append(miss)
        hits.append(hit)
        keys.append(first.embedding_key)
    return misses, hits, keys


def _channel(address: str) -> grpc.aio.Channel:
    limit = 256 * 1024 * 1024
    return grpc.aio.insecure_channel(
        address, options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    )


def _forward_counters(server: EncoderProcess) -> tuple[float, float, float]:
    """(forward passes, images encoded, seconds in forward passes) so far, from the server's /metrics."""
    return (
        server.metric("mmserve_encoder_batch_size_count"),
        server.metric("mmserve_encoder_batch_size_sum"),
        server.metric("mmserve_encoder_encode_seconds_sum"),
    )


class Samples:
    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.values[name])


async def run_all(
    batched: EncoderProcess, unbatched: EncoderProcess, remote: EncoderProcess, pool: ImagePool, repeats: int
) -> tuple[Samples, list[str]]:
    """Every figure once per repeat, interleaved, so that load from elsewhere on the machine hits all alike."""
    samples, redis_keys = Samples(), []
    async with _channel(batched.address) as a, _channel(unbatched.address) as b, _channel(remote.address) as c:
        local, single, shared = (encoder_pb2_grpc.EncoderStub(channel) for channel in (a, b, c))
        for stub in (local, single, shared):
            await _throughput(stub, pool.take(2), 2)  # warm-up
        for _ in range(repeats):
            misses, hits, _ = await _latencies(local, pool.take(6))
            samples.add("local_miss_ms", 1000 * statistics.median(misses))
            samples.add("local_hit_ms", 1000 * statistics.median(hits))
            misses, hits, keys = await _latencies(shared, pool.take(6))
            redis_keys += keys
            samples.add("redis_miss_ms", 1000 * statistics.median(misses))
            samples.add("redis_hit_ms", 1000 * statistics.median(hits))
            for clients, count in ((1, 12), (8, 32), (32, 64)):
                before = _forward_counters(batched)
                samples.add(f"ips_{clients}", await _throughput(local, pool.take(count), clients))
                after = _forward_counters(batched)
                passes, images, seconds = (now - then for now, then in zip(after, before, strict=True))
                samples.add(f"batch_{clients}", images / passes)
                samples.add(f"forward_ms_{clients}", 1000 * seconds / images)  # per image, server side
            samples.add("ips_8_unbatched", await _throughput(single, pool.take(32), 8))
    return samples, redis_keys


def image_flops(model: str, image: bytes) -> int:
    """FLOPs of encoding `image` (the pool's kind: every one has the same prepared shape), counted in this process."""
    encoder = VisionEncoder(ModelConfig(model=model))
    return VisionFlops(encoder).image(Image.open(io.BytesIO(image)).convert("RGB"))


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    threads = torch.get_num_threads()
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__} ({threads} threads); load average {load}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encoder_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (the bench preset)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis for the hit/miss run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; medians are reported")
    parser.add_argument("--max-batch-size", type=int, default=16, help="passed to the encoder")
    parser.add_argument("--max-batch-wait-ms", type=float, default=5.0, help="passed to the encoder")
    parser.add_argument("--peak-seconds", type=float, default=2.0, help="time spent measuring the matmul peak, twice")
    args = parser.parse_args(argv)
    pool = ImagePool()
    batching = ["--max-batch-size", str(args.max_batch_size), "--max-batch-wait-ms", str(args.max_batch_wait_ms)]
    try:
        with contextlib.closing(redis.Redis.from_url(args.redis_url, socket_timeout=2)) as client:
            client.ping()
    except redis.RedisError as exc:
        print(f"error: the hit/miss figures need Redis at {redacted_url(args.redis_url)} ({exc}); start one "
              "(redis-server --save '' --appendonly no) or pass --redis-url", file=sys.stderr)
        return 2
    print(f"machine: {machine()}", flush=True)
    flops = image_flops(args.model, ImagePool(seed=1).take(1)[0])  # another seed: the timed images stay the same
    peak = measure_matmul_peak(torch.float32, "cpu", args.peak_seconds)

    with contextlib.ExitStack() as stack:
        batched = stack.enter_context(launch_encoder(args.model, batching))
        unbatched = stack.enter_context(launch_encoder(args.model, ["--max-batch-size", "1"]))
        redis_args = [*batching, "--redis-url", args.redis_url, "--redis-timeout-ms", "1000"]
        remote = stack.enter_context(launch_encoder(args.model, redis_args))
        samples, keys = asyncio.run(run_all(batched, unbatched, remote, pool, args.repeats))
    peak = max(peak, measure_matmul_peak(torch.float32, "cpu", args.peak_seconds))  # load only lowers a measurement
    floor_s = compute_floor_seconds(flops, peak)  # per image
    with contextlib.closing(redis.Redis.from_url(args.redis_url)) as client:
        client.delete(*(f"mmserve:emb:{key}" for key in keys))

    m = samples.median
    one = m("ips_1")

    def share(images_per_s: float) -> str:
        return f"{images_per_s * floor_s:.1%} of compute floor"

    def ratio(name: str) -> str:
        return f"{m(name):.2f} ({m(name) / one:.2f}x; {share(m(name))})"

    def hit(kind: str) -> str:
        miss_ms, hit_ms = m(f"{kind}_miss_ms"), m(f"{kind}_hit_ms")
        return f"{miss_ms:.0f} ms / {hit_ms:.2f} ms ({100 * hit_ms / miss_ms:.2f}% of a miss)"

    forward_shares = " / ".join(f"{1000 * floor_s / m(f'forward_ms_{n}'):.0%}" for n in (1, 8, 32))
    lines = [
        f"Command: `make bench-encoder` (`python -m benchmarks.encoder_bench --model {args.model}`); encoder flags "
        f"`--max-batch-size {args.max_batch_size} --max-batch-wait-ms {args.max_batch_wait_ms:g}`; medians of "
        f"{args.repeats} interleaved runs; fresh 640x480 JPEGs (a miss unless stated), `return_embeddings=true`, "
        "float32 on CPU, client and servers on the same machine.",
        f"Machine: {machine()}.",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| encode latency, batch 1 (one client, cache miss, end to end) | {m('local_miss_ms'):.0f} ms |",
        f"| compute floor per image: FLOPs / fp32 matmul peak (best square torch.mm, {torch.get_num_threads()} "
        f"threads) | {flops / 1e9:.1f} GFLOP / {peak:.1f} GFLOP/s = {floor_s * 1000:.0f} ms |",
        f"| images/s, one at a time (one client) | {one:.2f} ({share(one)}) |",
        f"| images/s, 8 concurrent clients, dynamic batching | {ratio('ips_8')}, {m('batch_8'):.1f} images/pass |",
        f"| images/s, 32 concurrent clients, dynamic batching | {ratio('ips_32')}, {m('batch_32'):.1f} images/pass |",
        f"| images/s, 8 concurrent clients, `--max-batch-size 1` | {ratio('ips_8_unbatched')} |",
        "| vision tower + projector time per image (server side): 1 / 8 / 32 clients | "
        f"{m('forward_ms_1'):.0f} / {m('forward_ms_8'):.0f} / {m('forward_ms_32'):.0f} ms (compute floor "
        f"{floor_s * 1000:.0f} ms: {forward_shares}) |",
        f"| in-process LRU: miss / hit | {hit('local')} |",
        f"| Redis: miss / hit | {hit('redis')} |",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
