"""`python -m encoder_service`: --help, exit code 2 on bad settings, SIGTERM drains and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config import encoder_arg_parser, env_name
from encoder_service.__main__ import main
from protos import encoder_pb2, encoder_pb2_grpc
from tests.encoder.support import free_port, png_bytes

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    flags = [s for action in encoder_arg_parser({})._actions for s in action.option_strings if s.startswith("--")]
    for flag in flags:
        if flag != "--help":
            assert flag in text and env_name(flag) in text, flag
    for contract_flag in ("--model", "--host", "--port", "--redis-url", "--device", "--dtype", "--metrics-port"):
        assert contract_flag in flags


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "m", "--dtype", "float16"], "float16 is not supported on CPU"),
        (["--model", "m", "--max-batch-size", "0"], "--max-batch-size must be >= 1"),
        (["--model", "m", "--max-image-pixels", "100000000"], "MAX_IMAGE_PIXELS"),
        (["--model", "/nonexistent/checkpoint", "--port", "0"], "neither a checkpoint directory"),
    ],
)
def test_bad_settings_exit_2_with_the_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_sigterm_drains_and_exits_0(tiny_checkpoint: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MMSERVE_MAX_BATCH_WAIT_MS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "encoder_service", "--model", str(tiny_checkpoint), "--port", str(port)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while True:  # wait for start-up (imports, model load, warm-up)
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline and process.poll() is None, "encoder did not start"
                time.sleep(0.1)
            request = encoder_pb2.EncodeRequest(images=[encoder_pb2.ImageInput(data=png_bytes(3))])
            assert encoder_pb2_grpc.EncoderStub(channel).Encode(request, timeout=30).images[0].num_tokens == 16
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert "draining" in output
