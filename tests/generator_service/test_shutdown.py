"""`python -m generator_service` as a real process: SIGTERM drains (health NOT_SERVING, new calls refused,
in-flight streams finish within the grace period, the rest end UNAVAILABLE) and exits 0; bad flags exit 2."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import generator_pb2, generator_pb2_grpc
from tests.generator_service.support import StreamResult, collect, request, until
from tests.grpc_support import generator_process as start_generator_process

REPO = Path(__file__).resolve().parents[2]
GRACE_S = 1.0
LONG = 1900  # tokens: >= 1900 engine steps, several seconds even on a fast idle machine (~2 ms a step)
SERVICE = "mmserve.generator.v1.Generator"


def _health(channel: grpc.Channel, service: str = "") -> str:
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    except grpc.RpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


@pytest.fixture
def generator_process(tiny_checkpoint: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    env = {**os.environ, "MMSERVE_SHUTDOWN_GRACE_S": str(GRACE_S)}  # flags also come from MMSERVE_*
    args = ["--block-size", "4", "--num-kv-blocks", "2048", "--max-num-seqs", "8"]
    with start_generator_process(tiny_checkpoint, args, env) as started:
        yield started


def test_sigterm_drains_then_exits_zero(generator_process: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    process, address, log_path = generator_process
    with grpc.insecure_channel(address) as channel:
        deadline = time.monotonic() + 90
        while _health(channel) != "SERVING":
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the generator did not report SERVING"
            time.sleep(0.1)
        assert _health(channel, SERVICE) == "SERVING"

        async def run(stub: generator_pb2_grpc.GeneratorStub) -> tuple[StreamResult, StreamResult, StreamResult, str]:
            # 10 tokens fit the grace period (even at 15 ms a step); LONG tokens take several times longer.
            short = asyncio.ensure_future(collect(stub, request("USER: hi ASSISTANT:", max_tokens=10, ignore_eos=True)))
            long = asyncio.ensure_future(
                collect(stub, request("USER: story ASSISTANT:", max_tokens=LONG, ignore_eos=True))
            )
            call = stub.Generate(request("USER: story two ASSISTANT:", max_tokens=LONG, ignore_eos=True))
            await call.read()  # streams are running: now SIGTERM
            process.send_signal(signal.SIGTERM)
            await until(lambda: _health(channel) == "NOT_SERVING", timeout=5, what="NOT_SERVING after SIGTERM")
            health_by_name = _health(channel, SERVICE)
            refused = await collect(stub, request("USER: late ASSISTANT:", max_tokens=2))
            call.cancel()
            return await short, await long, refused, health_by_name

        async def main() -> tuple[StreamResult, StreamResult, StreamResult, str]:
            async with grpc.aio.insecure_channel(address) as aio_channel:
                return await run(generator_pb2_grpc.GeneratorStub(aio_channel))

        short, long, refused, health_by_name = asyncio.run(main())

    assert process.wait(timeout=30) == 0, log_path.read_text()[-3000:]
    assert health_by_name == "NOT_SERVING"
    assert refused.code == grpc.StatusCode.UNAVAILABLE and refused.messages == 0
    assert short.code == grpc.StatusCode.OK, short.details  # finished within the grace period
    assert short.finish_reason == generator_pb2.FINISH_REASON_LENGTH and len(short.token_ids) == 10
    assert long.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in long.details
    assert 0 < len(long.token_ids) < LONG

    # Structured logs: JSON lines with request ids, never the prompt text.
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    finished = [record for record in records if record.get("msg") == "request finished"]
    assert {record["status"] for record in finished} >= {"OK", "UNAVAILABLE"}
    assert all(record["request_id"].startswith("gen-") for record in finished)
    assert "story" not in log_path.read_text()


def test_bad_flags_exit_2(tiny_checkpoint: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "generator_service", "--model", str(tiny_checkpoint), "--max-num-seqs", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--max-num-seqs must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr
