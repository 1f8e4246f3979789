"""Tests for common.images.intake: untrusted bytes -> upright RGB, or ImageDecodeError.

Every image is built in memory with Pillow (or by hand, byte by byte, for headers Pillow will not write).
"""

from __future__ import annotations

import dataclasses
import io
import random
import re
import resource
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import GifImagePlugin, Image, ImageFile, PngImagePlugin, features

from common.images.intake import (
    ALLOWED_FORMATS,
    ImageDecodeError,
    ImageLimits,
    _safe_text,
    decode_image,
    describe_limits,
    to_rgb,
)

ALLOWED_TEXT = "allowed: JPEG, PNG, WebP, GIF, BMP"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
UNSAFE_TEXT = re.compile(r"\b0x[0-9a-fA-F]+|<[^>]*>| at 0x|BytesIO|Traceback")


# ---------------------------------------------------------------- builders


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def png_header_only(width: int, height: int, idat: bytes) -> bytes:
    """8-bit grayscale PNG whose IHDR claims width x height, with whatever IDAT we give it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def noise_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def quadrants(width: int = 32, height: int = 16) -> Image.Image:
    """Asymmetric RGB image: every flip and rotation of it is distinguishable."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height // 2))
    image.paste((0, 255, 0), (width // 2, 0, width, height // 2))
    image.paste((255, 255, 0), (0, height // 2, width // 4, height))
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)  # [height, width, 3]


def assert_client_safe(error: ImageDecodeError) -> None:
    assert not UNSAFE_TEXT.search(str(error)), str(error)


def decode_error(data: bytes, limits: ImageLimits = ImageLimits()) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, limits)
    assert_client_safe(caught.value)
    return caught.value


# ---------------------------------------------------------------- limits config


def test_default_limits_are_valid_frozen_and_describable() -> None:
    limits = ImageLimits()
    assert (limits.max_bytes, limits.max_pixels, limits.max_side, limits.min_side) == (20 << 20, 40_000_000, 16384, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_side = 1  # type: ignore[misc]
    assert "16384" in describe_limits(limits) and "WebP" in describe_limits(limits)


@pytest.mark.parametrize(
    ("kwargs", "hint"),
    [
        ({"max_bytes": 0}, "max_bytes"),
        ({"min_side": 0}, "min_side"),
        ({"max_side": 4, "min_side": 8}, "raise max_side"),
        ({"max_pixels": 3, "min_side": 2}, "raise max_pixels"),
        ({"max_pixels": 10**9}, "lower max_pixels"),  # above Pillow's bomb threshold: ours would never fire
    ],
)
def test_invalid_limits_raise_with_fix_hint(kwargs: dict[str, int], hint: str) -> None:
    with pytest.raises(ValueError, match=hint):
        ImageLimits(**kwargs)


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_allowed_formats_decode_to_rgb(fmt: str) -> None:
    source = quadrants()
    decoded = decode_image(encode(source, fmt, quality=95, subsampling=0, lossless=True))
    assert decoded.mode == "RGB" and decoded.size == source.size
    tolerance = 0 if fmt in ("PNG", "BMP", "GIF") else 40  # JPEG/WebP are lossy
    assert np.abs(pixels(decoded) - pixels(source)).max() <= tolerance


def _disallowed_samples() -> dict[str, bytes]:
    image = quadrants(16, 16)
    samples = {
        fmt: encode(image.convert(mode), fmt)
        for fmt, mode in [("TIFF", "RGB"), ("ICO", "RGB"), ("TGA", "RGB"), ("PDF", "RGB"), ("EPS", "RGB"),
                          ("DDS", "RGB"), ("PCX", "RGB"), ("PPM", "RGB"), ("SGI", "RGB"),
                          ("QOI", "RGB"), ("MSP", "1"), ("XBM", "1")]
    }
    samples["TIFF-big-tiles"] = encode(image, "TIFF", tile=(16, 16))
    samples["PSD"] = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 20000, 20000, 8, 3) + bytes(64)
    samples["FITS"] = b"SIMPLE  =                    T".ljust(80) + b"BITPIX  =                    8".ljust(80)
    if features.check("jpg_2000"):
        samples["JPEG2000"] = encode(image, "JPEG2000")
    return samples


@pytest.mark.parametrize(("name", "data"), list(_disallowed_samples().items()))
def test_disallowed_formats_are_rejected_by_allowlist(name: str, data: bytes) -> None:
    error = decode_error(data)
    assert str(error).startswith("unsupported image format (") and str(error).endswith(ALLOWED_TEXT)


def test_known_disallowed_format_is_named() -> None:
    assert "(TIFF)" in str(decode_error(encode(quadrants(), "TIFF")))
    assert "(PSD)" in str(decode_error(_disallowed_samples()["PSD"]))


def test_other_pillow_plugins_are_never_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    Image.init()  # register every plugin so we can trap each one that is not allowlisted
    tried: list[str] = []

    def trap(name: str) -> tuple[object, object]:
        def accept(prefix: bytes) -> bool:
            tried.append(name)
            return True

        def factory(fp: object, filename: object) -> None:
            tried.append(name)
            raise AssertionError(name)

        return factory, accept

    for name in [n for n in Image.OPEN if n not in ALLOWED_FORMATS]:
        monkeypatch.setitem(Image.OPEN, name, trap(name))
    for data in _disallowed_samples().values():
        decode_error(data)
    decode_error(random.Random(1).randbytes(512))
    assert tried == []


# ---------------------------------------------------------------- sizes


def test_empty_and_oversized_bytes_are_rejected() -> None:
    assert str(decode_error(b"")) == "image is empty (0 bytes)"
    data = encode(noise_rgb(32, 32), "PNG")
    error = decode_error(data, ImageLimits(max_bytes=len(data) - 1))
    assert str(error) == f"image is {len(data)} bytes; limit is {len(data) - 1} bytes"
    assert decode_image(data, ImageLimits(max_bytes=len(data))).size == (32, 32)


@pytest.mark.parametrize("size", [(0, 5), (5, 0)])
def test_zero_sized_headers_are_rejected(size: tuple[int, int]) -> None:
    error = decode_error(png_header_only(*size, zlib.compress(bytes(64))))
    assert "PNG" in str(error)


def test_min_side_is_enforced_from_header() -> None:
    data = encode(Image.new("L", (1, 5)), "PNG")
    assert str(decode_error(data, ImageLimits(min_side=2))) == "image is 1 x 5; each side must be >= 2 px"
    assert decode_image(data).size == (1, 5)


def test_one_by_one_works_in_every_allowed_format() -> None:
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP"):
        decoded = decode_image(encode(Image.new("RGB", (1, 1), (200, 10, 10)), fmt))
        assert decoded.mode == "RGB" and decoded.size == (1, 1)


@pytest.mark.parametrize(("size", "max_side", "accepted"), [
    ((1, 16384), 16384, True), ((1, 16385), 16384, False), ((16385, 1), 16384, False),
    ((1, 100_000), 16384, False), ((1, 100_000), 100_000, True), ((100_000, 1), 99_999, False),
])
def test_extreme_aspect_ratio_follows_max_side(size: tuple[int, int], max_side: int, accepted: bool) -> None:
    data = encode(Image.new("L", size, 7), "PNG")
    limits = ImageLimits(max_side=max_side)
    if accepted:
        decoded = decode_image(data, limits)
        assert decoded.size == size and decoded.getpixel((0, 0)) == (7, 7, 7)
    else:
        assert str(decode_error(data, limits)) == f"image is {size[0]} x {size[1]}; each side must be <= {max_side} px"


def _assert_rejected_before_decode(data: bytes, monkeypatch: pytest.MonkeyPatch) -> ImageDecodeError:
    def no_load(self: Image.Image) -> None:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_load)
    decode_image(encode(Image.new("L", (2, 2)), "BMP"))  # warm up plugin imports before timing
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    error = decode_error(data)
    elapsed_s = time.perf_counter() - start
    assert elapsed_s < 0.05
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib < 50 * 1024  # peak RSS (KiB)
    return error


def test_bomb_header_20000x20000_is_rejected_fast_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = png_header_only(20000, 20000, zlib.compress(bytes(4096)))
    assert len(data) < 4096
    error = _assert_rejected_before_decode(data, monkeypatch)
    assert "400000000 pixels" in str(error) and "limit is 40000000 pixels" in str(error)


def test_pillow_bomb_warning_becomes_an_error_locally_only(monkeypatch: pytest.MonkeyPatch) -> None:
    data = png_header_only(10000, 10000, zlib.compress(bytes(64)))  # 100M px: above Pillow's warning, below 2x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # even if the process ignores it
        filters_before = list(warnings.filters)
        error = _assert_rejected_before_decode(data, monkeypatch)
        assert warnings.filters == filters_before
    assert str(error).startswith("image is too large (DecompressionBombWarning: Image size (100000000 pixels)")
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # untouched global


def test_all_zero_deflate_bomb_above_our_cap_but_below_pillows_is_ours_to_reject(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    width, height = 8000, 6000  # 48M px: above our 40M default, below Pillow's 89.5M warning
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(bytes((width + 1) * 500)) for _ in range(height // 500)) + compressor.flush()
    data = png_header_only(width, height, idat)  # a genuine 48 MB image in ~47 kB
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Image.open(io.BytesIO(data)).size == (width, height)  # Pillow alone would go on to decode it
    error = _assert_rejected_before_decode(data, monkeypatch)
    assert str(error) == "image is 8000 x 6000 = 48000000 pixels; limit is 40000000 pixels"


def test_our_pixel_cap_is_independent_of_pillows() -> None:
    limits = ImageLimits(max_pixels=10_000)
    over, at = encode(noise_rgb(200, 100), "PNG"), encode(noise_rgb(100, 100), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow alone, bomb warnings as errors: accepts and decodes it
        with Image.open(io.BytesIO(over)) as image:
            image.load()
    assert str(decode_error(over, limits)) == "image is 200 x 100 = 20000 pixels; limit is 10000 pixels"
    assert decode_image(at, limits).size == (100, 100)


# ---------------------------------------------------------------- animation


def gif_with_frames(num_frames: int) -> tuple[bytes, Image.Image]:
    """An 8x8 Pillow-encoded first frame followed by num_frames - 1 hand-written 1x1 frames."""
    first = Image.new("P", (8, 8), 1)
    first.putpalette([0, 0, 0, 200, 30, 30, 30, 200, 30] + [0] * (253 * 3))
    first.putpixel((0, 0), 2)
    head = encode(first, "GIF")
    assert head.endswith(b";")
    frame = (
        b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # graphic control extension: 100 ms delay
        + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)  # image descriptor, 1x1 at (0, 0)
        + b"\x02\x02\x44\x01\x00"  # LZW min code size 2, one 2-byte sub-block, terminator
    )
    return b"GIF89a" + head[6:-1] + frame * (num_frames - 1) + b";", first.convert("RGB")


def test_10000_frame_gif_decodes_frame_0_in_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    data, expected = gif_with_frames(10_000)
    with Image.open(io.BytesIO(data)) as image:  # the fixture really is an animation (Pillow sees frame 2)
        image.seek(1)

    def forbidden(self: Image.Image) -> int:
        raise AssertionError("n_frames read on untrusted input")

    def seek_frame_0_only(self: Image.Image, frame: int) -> None:
        raise AssertionError(f"seek({frame})")

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "n_frames", property(forbidden))
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "is_animated", property(forbidden))
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "seek", seek_frame_0_only)
    start = time.perf_counter()
    decoded = decode_image(data)
    assert time.perf_counter() - start < 0.1
    assert np.array_equal(pixels(decoded), pixels(expected))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_animated_images_use_frame_0(fmt: str) -> None:
    frames = [Image.new("RGB", (16, 16), color) for color in [(250, 0, 0), (0, 250, 0), (0, 0, 250)]]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, lossless=True)
    with Image.open(io.BytesIO(data)) as image:
        assert getattr(image, "n_frames", 1) == 3  # read here only to prove the fixture is animated
    assert np.abs(pixels(decode_image(data)) - [250, 0, 0]).max() <= 2


# ---------------------------------------------------------------- truncated / corrupt


def _corrupt_samples() -> dict[str, bytes]:
    png = encode(noise_rgb(64, 64), "PNG")
    jpeg = encode(noise_rgb(64, 64), "JPEG", quality=95)
    return {
        "png-after-header": png[:33],  # signature + IHDR, nothing else
        "png-signature-only": PNG_SIGNATURE,
        "png-half": png[: len(png) // 2],
        "jpeg-half": jpeg[: len(jpeg) // 2],
        "jpeg-soi-only": jpeg[:4],
        "gif-half": encode(noise_rgb(64, 64).convert("P"), "GIF")[:400],
        "bmp-half": encode(noise_rgb(64, 64), "BMP")[:6000],
        "webp-half": encode(noise_rgb(64, 64), "WEBP", quality=90)[:200],
        "png-bad-crc": png[:29] + b"\0\0\0\0" + png[33:],
    }


@pytest.mark.parametrize(("name", "data"), list(_corrupt_samples().items()))
def test_truncated_or_corrupt_allowed_formats(name: str, data: bytes) -> None:
    error = decode_error(data)
    assert re.match(r"image data is truncated or corrupt \((PNG|JPEG|GIF|BMP|WebP)\): \S", str(error))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("data", [b"PNG", b"GIF", random.Random(0).randbytes(4096), b"\x00" * 100, b"hello world"])
def test_non_image_bytes_are_rejected(data: bytes) -> None:
    assert str(decode_error(data)) == f"unsupported image format (unrecognized data); {ALLOWED_TEXT}"


def test_decoder_keeps_serving_after_bad_inputs() -> None:
    for data in [*_corrupt_samples().values(), b"", b"PNG"]:
        decode_error(data)
    assert decode_image(encode(quadrants(), "PNG")).size == (32, 16)


def test_safe_text_strips_addresses_reprs_and_echoed_bytes() -> None:
    error = OSError("cannot identify image file <_io.BytesIO object at 0x7f6d22180f90> at 0xDEADBEEF b'\\x00\\x01'")
    text = _safe_text(error)
    assert text.startswith("OSError: cannot identify image file")
    assert not UNSAFE_TEXT.search(text) and "\\x00" not in text
    assert _safe_text(SyntaxError("\x00\x1b\x07\n")) == "SyntaxError"
    assert len(_safe_text(ValueError("x" * 10_000))) < 200


# ---------------------------------------------------------------- EXIF orientation

# How a camera stores an upright picture for each EXIF orientation value: the decoder must undo it.
STORED_AS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # stored rotated 90 deg counter-clockwise; viewer rotates it clockwise
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_exif_orientation_is_applied(orientation: int, fmt: str) -> None:
    upright = quadrants()
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(upright.transpose(STORED_AS[orientation]), fmt, exif=exif, quality=95, subsampling=0, lossless=True)
    decoded = decode_image(data)
    assert decoded.size == upright.size
    assert np.abs(pixels(decoded) - pixels(upright)).max() <= (0 if fmt == "PNG" else 40)


def test_corrupt_exif_is_ignored_even_when_warnings_are_errors() -> None:
    # IFD claims an orientation entry but the data stops 2 bytes short: Pillow only warns (UserWarning).
    exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00"
    data = encode(Image.new("RGB", (4, 2), (9, 9, 9)), "JPEG", exif=exif)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning):
            Image.open(io.BytesIO(data))
        decoded = decode_image(data)
    assert decoded.size == (4, 2) and np.abs(pixels(decoded) - 9).max() <= 2


# ---------------------------------------------------------------- modes


def _half_transparent_red(mode: str) -> Image.Image:
    return Image.new(mode, (4, 4), (255, 0, 0, 128) if mode == "RGBA" else (100, 128))


def _palette(transparent_index: int | None) -> Image.Image:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    image.paste(1, (0, 0, 2, 4))  # left half is index 1 (blue), right half index 0 (red)
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


def _rgb_with_color_key() -> Image.Image:
    image = Image.new("RGB", (4, 4), (10, 20, 30))
    image.paste((0, 0, 0), (0, 0, 2, 4))
    image.info["transparency"] = (0, 0, 0)
    return image


MODE_CASES: dict[str, tuple[Image.Image, tuple[str, ...], list[int], list[int]]] = {
    # name: (image, formats that carry it, expected left pixel, expected right pixel)
    "1": (Image.new("1", (4, 4), 1), ("PNG", "BMP"), [255, 255, 255], [255, 255, 255]),
    "L": (Image.new("L", (4, 4), 100), ("PNG", "BMP", "JPEG"), [100, 100, 100], [100, 100, 100]),
    "LA": (_half_transparent_red("LA"), ("PNG",), [177, 177, 177], [177, 177, 177]),
    "P": (_palette(None), ("PNG", "BMP", "GIF"), [0, 0, 255], [255, 0, 0]),
    "P+tRNS": (_palette(1), ("PNG", "GIF"), [255, 255, 255], [255, 0, 0]),
    "RGB+tRNS": (_rgb_with_color_key(), ("PNG",), [255, 255, 255], [10, 20, 30]),
    "RGBA": (_half_transparent_red("RGBA"), ("PNG", "WEBP"), [255, 127, 127], [255, 127, 127]),
}


@pytest.mark.parametrize(
    ("case", "fmt"), [(case, fmt) for case, (_, formats, _, _) in MODE_CASES.items() for fmt in formats]
)
def test_mode_matrix_full_decode_path(case: str, fmt: str) -> None:
    image, _, left, right = MODE_CASES[case]
    params = {"transparency": image.info["transparency"]} if "transparency" in image.info else {}
    data = encode(image, fmt, lossless=True, **params)
    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    tolerance = 1 if fmt != "JPEG" else 2  # rounding of alpha compositing; JPEG gray is near-exact
    assert np.abs(pixels(decoded)[0, 0] - left).max() <= tolerance
    assert np.abs(pixels(decoded)[0, 3] - right).max() <= tolerance
    assert decode_image(data).tobytes() == decoded.tobytes()  # deterministic


def test_adobe_inverted_cmyk_jpeg_decodes_to_the_right_colour() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = encode(cmyk, "JPEG", quality=95)
    assert b"Adobe" in data  # Pillow writes the APP14 marker and inverted samples
    assert np.abs(pixels(decode_image(data))[8, 8] - [255, 0, 0]).max() <= 8
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)


def test_16_bit_png_ramp_stays_a_ramp() -> None:
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(1, 256).repeat(4, axis=0)  # 0 .. 65535
    data = encode(Image.fromarray(ramp), "PNG")
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "I;16"
    decoded = pixels(decode_image(data))
    assert np.array_equal(decoded[0, :, 0], np.arange(256))  # 65535 -> 255, 257*k -> k: not clipped to white
    assert np.array_equal(decoded[..., 0], decoded[..., 2])


def test_16_bit_png_color_key_is_composited_on_white() -> None:
    ramp = (np.arange(16, dtype=np.uint16) * 1000).reshape(1, 16)
    decoded = pixels(decode_image(encode(Image.fromarray(ramp), "PNG", transparency=0)))
    assert decoded[0, 0].tolist() == [255, 255, 255] and decoded[0, 1].tolist() == [3, 3, 3]  # 1000 >> 8


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I;16", [0, 255, 256, 32768, 65535], [0, 0, 1, 128, 255]),
        ("I;16B", [0, 255, 256, 32768, 65535], [0, 0, 1, 128, 255]),
        ("I", [-5, 0, 4096, 65535, 1_000_000], [0, 0, 16, 255, 255]),
        ("F", [0.0, 0.5, 1.0, -1.0, float("nan")], [0, 128, 255, 0, 0]),
        ("F", [0.0, 127.6, 300.0, -1.0, float("inf")], [0, 128, 255, 0, 255]),
    ],
)
def test_wide_modes_scale_by_nominal_range(mode: str, values: list[float], expected: list[int]) -> None:
    image = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert pixels(rgb)[0, :, 1].tolist() == expected


def test_i16_little_and_big_endian_agree() -> None:
    ramp = np.arange(0, 65536, 4099, dtype=np.uint16).reshape(1, -1)
    little = Image.fromarray(ramp)
    big = Image.frombytes("I;16B", little.size, ramp.astype(">u2").tobytes())
    assert to_rgb(little).tobytes() == to_rgb(big).tobytes()


def test_unsupported_pixel_mode_is_a_decode_error() -> None:
    with pytest.raises(ImageDecodeError, match="unsupported pixel mode LAB"):
        to_rgb(Image.new("LAB", (2, 2)))


# ---------------------------------------------------------------- fuzz


def _mutate(data: bytes, rng: random.Random) -> bytes:
    mutated = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if not mutated:
            break
        choice = rng.random()
        position = rng.randrange(len(mutated))
        if choice < 0.6:
            mutated[position] = rng.randrange(256)
        elif choice < 0.8:
            del mutated[position:position + rng.randint(1, 64)]
        else:
            mutated[position:position] = rng.randbytes(rng.randint(1, 16))
    return bytes(mutated)


def test_fuzzed_inputs_decode_or_raise_image_decode_error_only() -> None:
    rng = random.Random(20240601)
    seeds = [
        encode(noise_rgb(24, 24), "PNG"),
        encode(noise_rgb(24, 24), "JPEG"),
        gif_with_frames(3)[0],
        encode(_half_transparent_red("RGBA"), "WEBP", lossless=True),
        encode(Image.new("P", (8, 8), 3), "BMP"),
    ]
    outcomes = {"decoded": 0, "rejected": 0}
    for i in range(300):
        data = _mutate(seeds[i % len(seeds)], rng)
        try:
            decoded = decode_image(data)
        except ImageDecodeError as error:
            assert_client_safe(error)
            outcomes["rejected"] += 1
        else:
            assert decoded.mode == "RGB"
            outcomes["decoded"] += 1
    assert outcomes["decoded"] > 0 and outcomes["rejected"] > 0
