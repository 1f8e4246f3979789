"""Shared pieces of the fuzz tests: how many examples, a seed corpus of real images, byte mutations, and a decode
call that cannot hang the test run.

    MMSERVE_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/fuzz -m fuzz -q --hypothesis-show-statistics

Unset, each property runs DEFAULT_EXAMPLES derandomized examples (the same ones every run, so `make test` never turns
red on a discovery unrelated to the change under test); with the variable set, examples are random and a failure
prints the `@reproduce_failure` blob to replay it.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from PIL import Image

from common.images.errors import InvalidImageError
from common.images.intake import ImageLimits, decode_image

_T = TypeVar("_T")
DEFAULT_EXAMPLES = 25  # per property: `tests/fuzz` runs in well under 60 s on 2 cores
EXAMPLES = int(os.environ.get("MMSERVE_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
CAT_JPEG = Path(__file__).resolve().parents[2] / "examples" / "cat.jpg"
# A message a client may see: no address, repr, stack or file path (what intake's _safe_text strips).
UNSAFE_TEXT = re.compile(r"0x[0-9a-fA-F]{6,}|<[\w.]+ object at|<class '|Traceback|BytesIO|File \"")


def fuzz_settings(*, deadline_s: float, examples: int = EXAMPLES) -> settings:
    """Hypothesis settings for one property: `examples` examples, each within `deadline_s` (checked after it
    returns; a real hang is caught by `call_within`), no example database written into the repository."""
    return settings(
        max_examples=examples,
        deadline=timedelta(seconds=deadline_s),
        derandomize="MMSERVE_FUZZ_EXAMPLES" not in os.environ,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuzz-call")


def call_within(timeout_s: float, function: Callable[..., _T], *args: Any) -> _T:
    """`function(*args)` on a worker thread; AssertionError if it has not returned after `timeout_s` (a hang).

    The thread cannot be killed, but the test fails instead of blocking the run forever.
    """
    future = _worker.submit(function, *args)
    try:
        return future.result(timeout=timeout_s)
    except FutureTimeout:
        raise AssertionError(
            f"{getattr(function, '__name__', function)} did not return within {timeout_s:g} s"
        ) from None


def check_decode(data: bytes, limits: ImageLimits, timeout_s: float = 30.0) -> Image.Image | InvalidImageError:
    """Decode untrusted bytes under `limits`: an RGB image within them, or the domain error with a client-safe
    message. Any other exception propagates (and fails the property)."""
    try:
        image = call_within(timeout_s, decode_image, data, limits)
    except InvalidImageError as error:
        assert not UNSAFE_TEXT.search(str(error)), str(error)
        assert str(error), "an empty error message"
        _event("refused: " + re.sub(r"\d+", "N", str(error).split(":")[0].split(";")[0]))
        return error
    width, height = image.size
    assert image.mode == "RGB", image.mode
    assert limits.min_side <= min(width, height) and max(width, height) <= limits.max_side, image.size
    assert width * height <= limits.max_pixels, image.size
    image.load()  # its pixels are really there
    _event("decoded")
    return image


def _event(kind: str) -> None:
    """Count an outcome for --hypothesis-show-statistics (outside a hypothesis test there is nothing to count)."""
    if currently_in_test_context():
        event(kind)


# ---------------------------------------------------------------------------------------------------------------
# Seed corpus: real files of every format intake allows (and TIFF, which it refuses), made by Pillow.


def _save(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@cache
def seed_corpus() -> dict[str, bytes]:
    """name -> file bytes: examples/cat.jpg plus small Pillow-made PNG, GIF, WebP, BMP, JPEG and TIFF files in
    several modes (alpha, palette, 16-bit, EXIF-rotated, animated, progressive)."""
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 to display upright
    ramp16 = Image.fromarray((np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80).astype(np.uint16))
    frames = [rgb.rotate(angle).convert("P") for angle in (0, 90, 180)]
    return {
        "cat.jpg": CAT_JPEG.read_bytes(),
        "rgb.png": _save(rgb, "PNG"),
        "rgba.png": _save(rgba, "PNG"),
        "palette-trns.png": _save(rgb.convert("P"), "PNG", transparency=0),
        "gray16.png": _save(ramp16, "PNG"),
        "exif.png": _save(rgb, "PNG", exif=exif.tobytes()),
        "animated.gif": _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=20, loop=0),
        "lossy.webp": _save(rgb, "WEBP", quality=60),
        "lossless-alpha.webp": _save(rgba, "WEBP", lossless=True),
        "rgb.bmp": _save(rgb, "BMP"),
        "progressive-exif.jpg": _save(rgb, "JPEG", progressive=True, exif=exif.tobytes()),
        "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG"),
        "rgb.tiff": _save(rgb, "TIFF"),
    }


# ---------------------------------------------------------------------------------------------------------------
# Mutations: what a broken upload, a truncated transfer or a hostile client does to a real file.


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A seed file with 1-8 mutations: bytes flipped or set (often in the header, where lengths and sizes live),
    truncated, a range deleted or duplicated, random bytes inserted, or a piece of another seed spliced in."""
    corpus = seed_corpus()
    data = bytearray(corpus[draw(st.sampled_from(sorted(corpus)))])
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        # Half of the positions in bytes 8-63, past most magic numbers (a broken one only reaches the sniffer):
        # headers hold the sizes and lengths parsers trust.
        last = len(data) - 1
        position = draw(st.one_of(st.integers(min(8, last), min(63, last)), st.integers(0, last)))
        operation = draw(st.sampled_from(["flip", "set", "truncate", "delete", "duplicate", "insert", "splice"]))
        if operation == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set":
            data[position] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]))
        elif operation == "truncate":
            del data[position:]
        elif operation == "delete":
            del data[position : position + draw(st.integers(1, 64))]
        elif operation == "duplicate":
            end = position + draw(st.integers(1, 256))
            data[position:position] = data[position:end]
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=32))
        else:
            other = corpus[draw(st.sampled_from(sorted(corpus)))]
            start = draw(st.integers(0, len(other) - 1))
            data[position:position] = other[start : start + draw(st.integers(1, 512))]
    return bytes(data)


# Leading bytes that get random data past the format sniffing into each allowed plugin's parser.
MAGIC_PREFIXES = (
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    b"\xff\xd8\xff",
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"RIFF\x00\x00\x00\x00WEBPVP8L",
    b"II*\x00",
)


def prefixed_bytes() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, often behind a format's magic number."""
    return st.builds(lambda prefix, rest: prefix + rest, st.sampled_from(MAGIC_PREFIXES), st.binary(max_size=2048))
