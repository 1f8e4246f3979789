"""benchmarks.serve_bench: request synthesis, load generation and metrics against a fake Generator over
loopback gRPC, and the --launch lifecycle with fake service modules in child processes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import random
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image

from benchmarks.serve_bench import BenchConfig, build_requests, main, run_benchmark
from benchmarks.serve_launch import LaunchError, launch_services
from protos import encoder_pb2, generator_pb2, generator_pb2_grpc


class FakeGenerator(generator_pb2_grpc.GeneratorServicer):
    """Streams max_tokens one-token messages, then LENGTH with usage. No request proceeds until `gate_at`
    are in flight together (so a concurrency limit shows up as the peak); `fail_images` rejects image requests."""

    def __init__(self, gate_at: int = 1, fail_images: bool = False) -> None:
        self.requests: list[generator_pb2.GenerateRequest] = []
        self.in_flight = self.peak = 0
        self.gate_at, self.fail_images = gate_at, fail_images
        self.gate = asyncio.Event()

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[generator_pb2.GenerateResponse]:
        self.requests.append(request)
        if self.fail_images and request.images:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "waiting queue is full")
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.in_flight >= self.gate_at:
                self.gate.set()
            await asyncio.wait_for(self.gate.wait(), 5)
            for i in range(request.sampling.max_tokens):
                yield generator_pb2.GenerateResponse(token_ids=[i], text="w ")
            usage = generator_pb2.Usage(
                prompt_tokens=len(request.prompt.split()), completion_tokens=request.sampling.max_tokens
            )
            yield generator_pb2.GenerateResponse(finish_reason=generator_pb2.FINISH_REASON_LENGTH, usage=usage)
        finally:
            self.in_flight -= 1

    async def GetModelInfo(self, request: Any, context: Any) -> encoder_pb2.ModelInfo:
        return encoder_pb2.ModelInfo(model_id="fake", image_placeholder="<img>")


@contextlib.contextmanager
def serve(fake: FakeGenerator) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        generator_pb2_grpc.add_GeneratorServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


SMALL = BenchConfig(num_requests=6, image_share=0.5, image_size=8, input_len=(4, 6), output_len=(3, 3), warmup=False)


def test_build_requests_mix_is_exact_and_seeded() -> None:
    config = BenchConfig(num_requests=20, image_share=0.5, repeat_image_share=0.4, image_size=8, input_len=(3, 5))
    requests = build_requests(config, placeholder="<img>")
    assert requests == build_requests(config, placeholder="<img>")  # same seed, same requests
    with_image = [r for r in requests if r.images]
    assert len(with_image) == 10 and all(r.prompt.startswith("<img>\n") for r in with_image)
    assert not any("<img>" in r.prompt for r in requests if not r.images)
    counts: dict[bytes, int] = {}
    for r in with_image:
        counts[r.images[0]] = counts.get(r.images[0], 0) + 1
    assert sorted(counts.values()) == [1] * 6 + [4]  # 4 reuse one image, 6 get their own
    assert Image.open(io.BytesIO(with_image[0].images[0])).size == (8, 8)
    assert all(3 <= r.prompt_words <= 5 and len(r.prompt.split()) - bool(r.images) == r.prompt_words for r in requests)
    other_seed = build_requests(dataclasses.replace(config, seed=1), placeholder="<img>")
    assert [r.prompt for r in other_seed] != [r.prompt for r in requests]


def test_build_requests_cycles_through_image_files(tmp_path: Path) -> None:
    for name in ("a.png", "b.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(name.encode())
    requests = build_requests(BenchConfig(num_requests=4, images=(str(tmp_path),)))
    assert [r.images for r in requests] == [(b"a.png",), (b"b.jpg",), (b"a.png",), (b"b.jpg",)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no .* files"):
        build_requests(BenchConfig(images=(str(tmp_path / "empty"),)))


def test_run_benchmark_measures_every_request_under_a_concurrency_limit() -> None:
    fake = FakeGenerator(gate_at=2)
    with serve(fake) as address:
        result = run_benchmark(address, dataclasses.replace(SMALL, max_concurrency=2))
    assert fake.peak == 2
    sent = fake.requests
    assert all(
        r.sampling.ignore_eos and r.sampling.max_tokens == 3 and r.sampling.HasField("temperature") for r in sent
    )
    assert sum(r.prompt.startswith("<img>\n") for r in sent) == 3  # the placeholder comes from GetModelInfo
    assert len({r.request_id for r in sent}) == 6
    for r in result.requests:
        assert r.error is None and r.output_tokens == 3 and len(r.itl_s) == 2 and r.finish_reason.endswith("LENGTH")
        assert r.ttft_s is not None and r.e2e_s is not None and 0 < r.ttft_s <= r.e2e_s
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 2)
    summary = result.summary()
    assert (summary["completed"], summary["failed"], summary["total_output_tokens"]) == (6, 0, 18)
    assert summary["request_throughput"] == pytest.approx(6 / result.duration_s)
    assert summary["ttft_ms"]["p99"] >= summary["ttft_ms"]["median"] > 0


def test_poisson_arrivals_wait_the_drawn_gaps() -> None:
    config = BenchConfig(num_requests=4, request_rate=100.0, image_share=0.0, output_len=(1, 1), seed=7)
    fake = FakeGenerator()
    with serve(fake) as address:
        result = run_benchmark(address, config)
    warmup, *measured = fake.requests
    assert warmup.prompt == "Warm up." and warmup.sampling.max_tokens == 2 and len(measured) == 4
    draws = random.Random(config.seed + 1)
    earliest = 0.0
    for r in result.requests[1:]:
        earliest += draws.expovariate(config.request_rate)
        assert r.start_s >= earliest


def test_cli_reports_errors_by_status_and_writes_json(tmp_path: Path, capsys: Any) -> None:
    fake = FakeGenerator(fail_images=True)
    with serve(fake) as address:
        argv = ["--address", address, "--num-requests", "4", "--image-share", "0.5", "--image-size", "8"]
        code = main([*argv, "--output-len", "2", "--no-warmup", "--json", str(tmp_path / "out.json")])
        report = capsys.readouterr().out
        assert main(argv) == 1 and len(fake.requests) == 4 + 1  # the warm-up (with an image) fails: no run
    assert (
        capsys.readouterr().err
        == f"error: {address}: RESOURCE_EXHAUSTED: waiting queue is full (before the measured requests)\n"
    )
    assert code == 1  # a run with failures is not a clean figure
    assert "\nSuccessful requests:                    2\nFailed requests:                        2\n" in report
    assert "\nMean TTFT (ms):" in report
    assert "Errors by status: RESOURCE_EXHAUSTED=2" in report
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["config"]["request_rate"] == "inf" and len(saved["requests"]) == 4
    assert saved["summary"]["errors_by_status"] == {"RESOURCE_EXHAUSTED": 2}
    assert {r["error_details"] for r in saved["requests"] if r["error"]} == {"waiting queue is full"}


FAKE_SERVICE = """
    import argparse, asyncio, json, os, signal, sys
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from protos import encoder_pb2, generator_pb2, generator_pb2_grpc

    class Generator(generator_pb2_grpc.GeneratorServicer):
        async def Generate(self, request, context):
            for i in range(request.sampling.max_tokens):
                yield generator_pb2.GenerateResponse(token_ids=[i], text="x")

        async def GetModelInfo(self, request, context):
            return encoder_pb2.ModelInfo(image_placeholder="<image>")

    async def main():
        parser = argparse.ArgumentParser()
        parser.add_argument("--port")
        args, _ = parser.parse_known_args()
        with open(os.path.join(os.environ["FAKESVC_DIR"], args.port + ".json"), "w") as f:
            json.dump(sys.argv[1:], f)
        server = grpc.aio.server()
        generator_pb2_grpc.add_GeneratorServicer_to_server(Generator(), server)
        checker = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        for name in ("mmserve.encoder.v1.Encoder", "mmserve.generator.v1.Generator"):
            await checker.set(name, health_pb2.HealthCheckResponse.SERVING)
        server.add_insecure_port("127.0.0.1:" + args.port)
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(1)

    asyncio.run(main())
"""


@pytest.fixture
def fake_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "fakesvc.py").write_text(textwrap.dedent(FAKE_SERVICE))
    crash = "import sys\nprint('cannot load /nope: no config.json', file=sys.stderr)\nsys.exit(3)\n"
    (tmp_path / "crashsvc.py").write_text(crash)
    (tmp_path / "hangsvc.py").write_text("import time\nprint('loading weights...', flush=True)\ntime.sleep(60)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("FAKESVC_DIR", str(tmp_path))
    return tmp_path


def test_launch_waits_for_serving_runs_and_stops_with_sigterm(fake_modules: Path) -> None:
    launch = launch_services("some/model", generator_args=["--max-num-seqs", "4"], modules=("fakesvc", "fakesvc"))
    with launch as services:
        config = BenchConfig(num_requests=2, image_share=0.0, input_len=(1, 1), output_len=(2, 2))
        result = run_benchmark(services.generator_address, config)
    assert result.summary()["completed"] == 2
    assert [p.returncode for p in services.processes] == [0, 0]  # SIGTERM handled, not SIGKILL
    generator_port = services.generator_address.rsplit(":", 1)[1]
    argv = json.loads((fake_modules / f"{generator_port}.json").read_text())
    expected = ["--model", "some/model", "--host", "127.0.0.1", "--port", generator_port]
    assert argv == [*expected, "--encoder-address", services.encoder_address, "--max-num-seqs", "4"]


def test_launch_failure_shows_the_service_output(fake_modules: Path) -> None:
    crashed = r"(?s)encoder exited with status 3.*cannot load /nope: no config.json"
    with pytest.raises(LaunchError, match=crashed), launch_services("m", modules=("crashsvc", "fakesvc")):
        pass
    hung = r"(?s)encoder not SERVING after 1 s.*loading weights"
    with (
        pytest.raises(LaunchError, match=hung),
        launch_services("m", modules=("hangsvc", "fakesvc"), ready_timeout_s=1),
    ):
        pass
