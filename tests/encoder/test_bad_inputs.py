"""Every bad input of notes/reliability.md (items 1-9) gets the right status over gRPC; the next request succeeds.

Strips are not bad inputs: an image is refused only when the processor would resize it past the encoder's bound
(`VisionEncoder.check_image`), which at LLaVA-1.5's shortest edge (336) a 1 x 16384 line is, a 20 x 2000 strip not.
"""

from __future__ import annotations

import io
import json
import re
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from common.tensor_codec import tensor_from_proto
from protos import encoder_pb2, encoder_pb2_grpc
from tests.encoder.support import MiB, RunningServer, encoder_config, png_bytes

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNSAFE_TEXT = re.compile(r"0x[0-9a-fA-F]+|<[^>]*>|Traceback|BytesIO|File \"")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 250_000  # our own cap for this server, far below Pillow's 89.5M warning


def save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def png_header(width: int, height: int, idat: bytes = zlib.compress(b"\0" * 64)) -> bytes:
    """An 8-bit gray PNG whose IHDR claims width x height (Pillow will not write such files)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_inputs() -> dict[str, bytes]:
    png, jpeg = save(noise(64, 48), "PNG"), save(noise(64, 48), "JPEG", quality=90)
    return {
        "empty": b"",
        "random bytes": np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
        "text saying PNG": b"PNG image, trust me",
        "png cut after header": png[:33],
        "png cut at 50%": png[: len(png) // 2],
        "jpeg cut at 50%": jpeg[: len(jpeg) // 2],
        "bomb header 20000x20000": png_header(20000, 20000),
        "bomb 179M px all-zero deflate": png_header(13000, 13800, zlib.compress(b"\0" * 1_000_000, 9)),
        "just over our pixel cap": save(Image.new("L", (501, 500)), "PNG"),
        "zero width": png_header(0, 100),
        "zero height": png_header(100, 0),
        "1 x 100000": png_header(1, 100000),
        "tiff": save(noise(16, 16), "TIFF"),
        "ico": save(noise(16, 16), "ICO"),
        "tga": save(noise(16, 16), "TGA"),
        "pdf": save(noise(16, 16), "PDF"),
        "ppm": save(noise(16, 16), "PPM"),
        "psd header": b"8BPS\x00\x01" + b"\x00" * 64,
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
        "base64 text with bad characters": b"iVBORw0KGgo*AAAANSUhEUg!!==",
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    from common.demo_model import build_checkpoint

    path: Path = build_checkpoint(tmp_path_factory.mktemp("bad-inputs") / "tiny")
    config = encoder_config(
        path, max_image_pixels=MAX_PIXELS, max_images_per_request=4, max_image_bytes=MiB, max_message_bytes=4 * MiB
    )
    running = RunningServer(config)
    yield running
    running.close()


@pytest.fixture(scope="module")
def server_336(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The tiny checkpoint with LLaVA-1.5's resize (shortest edge 336, then its own 32 x 32 crop): the long edge
    of a strip is stretched as far as the real model stretches it."""
    from common.demo_model import build_checkpoint

    path: Path = build_checkpoint(tmp_path_factory.mktemp("bad-inputs-336") / "tiny")
    config_file = path / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["image_processor"]["size"] = {"shortest_edge": 336}
    config_file.write_text(json.dumps(config))
    running = RunningServer(encoder_config(path, max_image_bytes=MiB, max_message_bytes=4 * MiB))
    yield running
    running.close()


def expect_status(server: RunningServer, code: grpc.StatusCode, *images: bytes) -> str:
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as error:
        server.encode(*images)
    assert error.value.code() == code, error.value.details()
    details = str(error.value.details())
    assert not UNSAFE_TEXT.search(details), details  # no address, repr or stack (CVE-2026-22778)
    assert time.perf_counter() - started < 2.0  # rejected early, never decoded in full
    # The next good request is served normally.
    assert server.encode(png_bytes()).images[0].num_tokens == 16
    return details


@pytest.mark.parametrize("name", list(bad_inputs()))
def test_bad_image_is_invalid_argument(server: RunningServer, name: str) -> None:
    details = expect_status(server, INVALID, png_bytes(), bad_inputs()[name])
    assert details.startswith("images[1]: ")


def test_strips_are_encoded(server: RunningServer, server_336: RunningServer) -> None:
    """1:100 strips both ways, and at S = 32 even a 1 x 16384 line (32 x 524288 before the crop, under the bound)."""
    for running in (server, server_336):
        for size in [(20, 2000), (2000, 20)]:
            (result,) = running.encode(save(noise(*size), "PNG")).images
            assert result.num_tokens == 16 and bool(torch.isfinite(tensor_from_proto(result.embedding)).all())
    assert server.encode(save(Image.new("RGB", (1, 16384)), "PNG")).images[0].num_tokens == 16


def test_an_image_the_processor_would_blow_up_is_invalid_with_the_reason(server_336: RunningServer) -> None:
    details = expect_status(server_336, INVALID, png_bytes(), save(Image.new("RGB", (1, 16384)), "PNG"))
    assert details == (
        "images[1]: image is 1 x 16384: the processor would resize it to 336 x 5505024 pixels (5.17 G values), "
        "more than the limit of 64 M values"
    )


def test_limits_are_ours_and_exact(server: RunningServer) -> None:
    """500 x 500 = our cap exactly: accepted (Pillow alone would accept 89M)."""
    assert server.encode(save(Image.new("L", (500, 500)), "PNG")).images[0].num_tokens == 16
    assert "limit is 250000 pixels" in expect_status(server, INVALID, save(Image.new("L", (501, 500)), "PNG"))


def test_too_many_images_and_too_large_payloads_are_resource_exhausted(server: RunningServer) -> None:
    image = png_bytes()
    assert "limit is 4" in expect_status(server, EXHAUSTED, *[image] * 5)
    assert "limit is 1048576 bytes" in expect_status(server, EXHAUSTED, b"\0" * (MiB + 1))
    # Over the gRPC receive limit (4 MiB here): refused by gRPC itself before any of our code runs.
    big = grpc.insecure_channel(f"127.0.0.1:{server.server.port}", options=[("grpc.max_send_message_length", -1)])
    request = encoder_pb2.EncodeRequest(images=[encoder_pb2.ImageInput(data=b"\0" * (5 * MiB))])
    with pytest.raises(grpc.RpcError) as error:
        encoder_pb2_grpc.EncoderStub(big).Encode(request, timeout=30)
    big.close()
    assert error.value.code() == EXHAUSTED
    assert server.encode(image).images[0].num_tokens == 16


def test_no_images_and_unset_source_are_invalid(server: RunningServer) -> None:
    for request in (encoder_pb2.EncodeRequest(), encoder_pb2.EncodeRequest(images=[encoder_pb2.ImageInput()])):
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Encode(request, timeout=10)
        assert error.value.code() == INVALID


def test_odd_but_valid_images_are_encoded(server: RunningServer) -> None:
    """1x1 (CVE-2026-22773), every pixel mode, 16-bit gray, CMYK JPEG: all encode to finite embeddings."""
    base = noise(24, 20, seed=5)
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    palette_trns = base.convert("P")
    palette_trns.info["transparency"] = 0
    ramp16 = Image.fromarray((np.arange(24 * 20, dtype=np.uint16).reshape(20, 24) * 130).astype(np.uint16))
    images = {
        "1x1": save(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
        "mode 1": save(base.convert("1"), "PNG"),
        "mode L": save(base.convert("L"), "PNG"),
        "mode LA": save(base.convert("LA"), "PNG"),
        "mode P": save(base.convert("P"), "PNG"),
        "mode P+tRNS": save(palette_trns, "PNG", transparency=0),
        "mode RGBA": save(rgba, "PNG"),
        "mode I;16": save(ramp16, "PNG"),
        "CMYK jpeg": save(base.convert("CMYK"), "JPEG"),
        "webp": save(base, "WEBP", lossless=True),
        "bmp": save(base, "BMP"),
        "gif": save(base.convert("P"), "GIF"),
    }
    for name, data in images.items():
        (result,) = server.encode(data).images
        embedding = tensor_from_proto(result.embedding)
        assert embedding.shape == (16, 64) and bool(torch.isfinite(embedding).all()), name


def test_exif_orientation_is_applied_before_encoding(server: RunningServer) -> None:
    """A PNG stored rotated with EXIF orientation 3 encodes like the upright PNG; the keys (raw bytes) differ."""
    upright = noise(30, 20, seed=9)
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180 to display upright
    tagged = save(upright.rotate(180), "PNG", exif=exif.tobytes())
    plain, rotated = server.encode(save(upright, "PNG")).images[0], server.encode(tagged).images[0]
    assert plain.embedding == rotated.embedding
    assert plain.embedding_key != rotated.embedding_key


def test_animated_gif_uses_frame_zero_only_in_bounded_time(server: RunningServer) -> None:
    frames = [noise(8, 8, seed=i).convert("P") for i in range(2000)]
    animated = save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10, loop=0)
    single = save(frames[0], "GIF")
    started = time.perf_counter()
    (result,) = server.encode(animated).images
    assert time.perf_counter() - started < 2.0
    assert result.embedding == server.encode(single).images[0].embedding
