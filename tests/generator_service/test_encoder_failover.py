"""The encoder client's retry schedule on UNAVAILABLE.

The race it covers cannot be produced on demand with real replicas: when a replica dies, the calls it held fail
at once, and round_robin updates its picker a moment later, so an immediate retry can land on the dead replica
again (seen in CI under load). Here a call function plays the balancer: it answers UNAVAILABLE a given number of
times before it succeeds. The real-replica version is tests/faults/test_encoder_faults.py.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from generator_service.encoder_client import RemoteEncoder
from protos import encoder_pb2_grpc

TWO_REPLICAS = "127.0.0.1:1,127.0.0.1:2"  # one `ipv4:` target balanced by round_robin


class FlakyBalancer:
    """Fails the first `failures` tries with UNAVAILABLE, then answers; records when each try started."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.tries: list[float] = []

    async def __call__(self, stub: encoder_pb2_grpc.EncoderStub, timeout: float) -> str:
        self.tries.append(time.monotonic())
        if len(self.tries) <= self.failures:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="connection reset"
            )
        return "answer"


def call_with(address: str, balancer: FlakyBalancer, timeout: float = 5.0) -> tuple[str | None, list[str]]:
    """Runs one `_call` through a RemoteEncoder on `address`; returns (answer or None, counted error names)."""
    errors: list[str] = []

    async def run() -> str | None:
        encoder = RemoteEncoder(
            address, fingerprint="f", model_path="unused", dtype="float32", max_message_bytes=1 << 20,
            on_error=errors.append,
        )  # fmt: skip
        try:
            return await encoder._call(balancer, timeout)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            return None
        finally:
            await encoder.close()

    return asyncio.run(run()), errors


def test_a_retry_picked_onto_the_dead_replica_again_still_succeeds() -> None:
    # Two replicas, one dead: the first try and its immediate retry both hit it; the later ones reach the live one.
    balancer = FlakyBalancer(failures=3)
    answer, errors = call_with(TWO_REPLICAS, balancer)
    assert answer == "answer"
    assert len(balancer.tries) == 4 and errors == ["UNAVAILABLE"] * 3  # each failed try is counted
    gaps = [later - earlier for earlier, later in zip(balancer.tries, balancer.tries[1:], strict=False)]
    assert all(gap >= pause for gap, pause in zip(gaps, (0.02, 0.04, 0.08), strict=True))  # doubling pauses


def test_all_replicas_down_fails_fast() -> None:
    balancer = FlakyBalancer(failures=100)
    started = time.monotonic()
    answer, errors = call_with(TWO_REPLICAS, balancer)
    assert answer is None
    assert len(balancer.tries) == 4  # twice per server, then the error goes to the caller (who counts it)
    assert errors == ["UNAVAILABLE"] * 3
    assert time.monotonic() - started < 2.0  # well short of the 5 s timeout: pauses sum to 0.14 s


def test_retries_stop_at_the_deadline() -> None:
    balancer = FlakyBalancer(failures=100)
    answer, _ = call_with(TWO_REPLICAS, balancer, timeout=0.03)
    assert answer is None
    assert len(balancer.tries) < 4  # the pauses would outlast a 30 ms budget, so it stopped early


@pytest.mark.parametrize("address", ["127.0.0.1:1", "enc-a:1"])
def test_a_single_server_target_is_tried_once(address: str) -> None:
    balancer = FlakyBalancer(failures=1)
    answer, errors = call_with(address, balancer)
    assert answer is None and len(balancer.tries) == 1 and errors == []


def test_separate_targets_are_tried_once_each() -> None:
    balancer = FlakyBalancer(failures=1)
    answer, errors = call_with("enc-a:1,enc-b:2", balancer)  # two targets (host names): one try each
    assert answer == "answer" and len(balancer.tries) == 2 and errors == ["UNAVAILABLE"]
