"""Decode untrusted image bytes into upright RGB images for the vision tower.

Every step is bounded before the next one runs:

    1. byte count         len(data) <= max_bytes
    2. Image.open         header only, and only the ALLOWED_FORMATS plugins are ever tried
    3. header size        width, height and width*height checked BEFORE any pixel is decoded
    4. load()             frame 0 only: animated GIF/APNG/WebP are never seeked and n_frames is never read
    5. EXIF orientation   ImageOps.exif_transpose, so the output is upright
    6. mode -> RGB        alpha/transparency composited on a fixed WHITE background; 16/32-bit gray scaled to
                          8 bits by its nominal range (see _wide_to_gray)

Any failure inside Pillow becomes an ImageDecodeError whose text is safe to send to a client.

Pixel cap: ours (step 3) does not rely on Pillow's. Pillow's bomb check runs inside Image.open and, with its warning
raised as an error here, rejects headers above Image.MAX_IMAGE_PIXELS (89.5M) before ours runs; ImageLimits requires
max_pixels <= that value, so every header below it meets our cap. Neither global (MAX_IMAGE_PIXELS,
ImageFile.LOAD_TRUNCATED_IMAGES, which must stay False so truncated data raises) is changed here. The warning filters
are swapped with warnings.catch_warnings, which on Python 3.11 is process-wide rather than per thread.
"""

from __future__ import annotations

import re
import struct
import warnings
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.images.errors import InvalidImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_ALLOWED_TEXT = "JPEG, PNG, WebP, GIF, BMP"
BACKGROUND_RGB = (255, 255, 255)  # transparency is composited onto this fixed colour

# Everything Pillow's plugins are known to raise on malformed input (its fuzz harness sees all of these).
_PILLOW_ERRORS: tuple[type[Exception], ...] = (
    OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError, struct.error,
    ZeroDivisionError, OverflowError, Image.DecompressionBombError, Image.DecompressionBombWarning,
)
_RGB_CONVERTIBLE_MODES = frozenset({"1", "L", "P", "RGB", "CMYK", "YCbCr"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})

# Magic numbers, only to name the format in error messages; Pillow's allowlisted plugins do the real parsing.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"8BPS", "PSD"), (b"%PDF", "PDF"),
    (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"), (b"\xffO\xffQ", "JPEG2000"), (b"DDS ", "DDS"), (b"SIMPLE  =", "FITS"),
    (b"qoif", "QOI"), (b"icns", "ICNS"), (b"\x01\xda", "SGI"), (b"P6", "PPM"), (b"P5", "PPM"),
)
_REPR_RE = re.compile(r"<[^<>]*>")  # <_io.BytesIO object at 0x7f...>
_BYTES_RE = re.compile(r"""b(['"]).*?(?<!\\)\1""")  # b'\x00...' echoed from the input
_HEX_RE = re.compile(r"\b0x[0-9a-fA-F]+")
_EMPTY_PARENS_RE = re.compile(r"\(\s*\)")


@dataclass(frozen=True)
class ImageLimits:
    """Per-image limits, all checked before decoding pixels."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000  # width * height
    max_side: int = 16384  # either side
    min_side: int = 1

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes ({self.max_bytes}) must be >= 1: set it to the largest upload you accept")
        if self.min_side < 1:
            raise ValueError(f"min_side ({self.min_side}) must be >= 1: a zero-sized image cannot be encoded")
        if self.max_side < self.min_side:
            raise ValueError(f"max_side ({self.max_side}) < min_side ({self.min_side}): raise max_side")
        if self.max_pixels < self.min_side * self.min_side:
            raise ValueError(
                f"max_pixels ({self.max_pixels}) < min_side**2 ({self.min_side ** 2}): no image could pass; "
                "raise max_pixels or lower min_side"
            )
        pillow_cap = Image.MAX_IMAGE_PIXELS
        if pillow_cap is not None and self.max_pixels > pillow_cap:
            raise ValueError(
                f"max_pixels ({self.max_pixels}) > Pillow's MAX_IMAGE_PIXELS ({pillow_cap}), whose bomb check "
                "would reject those images first: lower max_pixels"
            )


class ImageDecodeError(InvalidImageError):
    """Bad image input; str(e) is a client-safe message (no memory addresses, no reprs, no stack)."""


def describe_limits(limits: ImageLimits) -> str:
    """One line for logs and error documentation."""
    return (
        f"formats {_ALLOWED_TEXT}; <= {limits.max_bytes} bytes; sides {limits.min_side}..{limits.max_side} px; "
        f"<= {limits.max_pixels} pixels"
    )


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode untrusted bytes into an upright RGB image (mode 'RGB'), or raise ImageDecodeError.

    Only frame 0 of animated images is decoded. Raises TypeError only when `data` is not bytes-like (a caller bug).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(f"image is {len(data)} bytes; limit is {limits.max_bytes} bytes")
    with warnings.catch_warnings():
        # Pillow's UserWarnings (corrupt EXIF, invalid APNG) describe the client's bytes: dropped, so a client can
        # neither flood our logs nor, under -W error, escape as a non-ImageDecodeError. Bomb warnings are errors.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with _open(data, limits) as image:
            _check_dimensions(image.size, limits)
            try:
                image.load()  # frame 0 only
                ImageOps.exif_transpose(image, in_place=True)
                return to_rgb(image)
            except ImageDecodeError:
                raise
            except _PILLOW_ERRORS as e:
                raise _corrupt(image.format, _safe_text(e)) from e


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    """Image.open restricted to ALLOWED_FORMATS; reads the header only."""
    sniffed = _sniff_format(bytes(data[:16]))
    try:
        return Image.open(BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as e:  # no allowlisted plugin accepted the header; its text has a repr
        if sniffed is not None and sniffed.upper() in ALLOWED_FORMATS:
            raise _corrupt(sniffed, "header could not be parsed") from e
        name = sniffed or "unrecognized data"
        raise ImageDecodeError(f"unsupported image format ({name}); allowed: {_ALLOWED_TEXT}") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"image is too large ({_safe_text(e)}); limit is {limits.max_pixels} pixels") from e
    except _PILLOW_ERRORS as e:
        raise _corrupt(sniffed, _safe_text(e)) from e


def _corrupt(image_format: str | None, detail: str) -> ImageDecodeError:
    name = "WebP" if image_format == "WEBP" else image_format or "unknown format"
    return ImageDecodeError(f"image data is truncated or corrupt ({name}): {detail}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Deterministic conversion of a loaded image to mode 'RGB'; transparency is composited onto white."""
    if image.mode in _WIDE_MODES:
        return _wide_to_gray(image).convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode in _RGB_CONVERTIBLE_MODES and "transparency" in image.info):
        rgba = image.convert("RGBA")  # applies a tRNS colour key / palette alpha
        background = Image.new("RGBA", image.size, (*BACKGROUND_RGB, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in _RGB_CONVERTIBLE_MODES:
        return image.convert("RGB")  # CMYK from JPEG is already un-inverted (Adobe) by Pillow's decoder
    raise ImageDecodeError(f"unsupported pixel mode {image.mode}")


def _wide_to_gray(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit gray image to 8 bits by its nominal range, so a 16-bit ramp stays a ramp.

    I;16*: value >> 8 (65535 -> 255). I (int32): clipped to [0, 65535], then >> 8, i.e. treated as 16-bit data,
    which is what PNG and TIFF put there. F: NaN -> 0; clip [0, 1] * 255 when max <= 1, else clip [0, 255].
    A 16-bit tRNS colour key becomes white, like the alpha path.
    """
    values = np.asarray(image)  # [height, width], uint16 / >u2 / int32 / float32
    if image.mode == "F":
        floats = np.where(np.isnan(values), 0.0, values.astype(np.float64))  # +-inf clip to 0 / 255 below
        if floats.max(initial=0.0) <= 1.0:
            floats = np.clip(floats, 0.0, 1.0) * 255.0
        gray = np.floor(np.clip(floats, 0.0, 255.0) + 0.5).astype(np.uint8)
    else:
        gray = (np.clip(values.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        key = image.info.get("transparency")
        if isinstance(key, int):
            gray[values == key] = 255
    return Image.fromarray(gray)  # mode L


def _check_dimensions(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if min(width, height) < limits.min_side:
        raise ImageDecodeError(f"image is {width} x {height}; each side must be >= {limits.min_side} px")
    if max(width, height) > limits.max_side:
        raise ImageDecodeError(f"image is {width} x {height}; each side must be <= {limits.max_side} px")
    if width * height > limits.max_pixels:
        raise ImageDecodeError(
            f"image is {width} x {height} = {width * height} pixels; limit is {limits.max_pixels} pixels"
        )


def _sniff_format(prefix: bytes) -> str | None:
    if prefix[:4] == b"RIFF" and prefix[8:12] == b"WEBP":
        return "WebP"
    if prefix[4:8] == b"ftyp":
        return "AVIF/HEIF"
    return next((name for magic, name in _MAGIC if prefix.startswith(magic)), None)


def _safe_text(exc: BaseException) -> str:
    """Exception class name plus its text with reprs, echoed bytes, addresses and control characters removed."""
    text = _HEX_RE.sub("", _REPR_RE.sub("", _BYTES_RE.sub("bytes", str(exc))))
    text = _EMPTY_PARENS_RE.sub("", "".join(c for c in text if " " <= c <= "~"))
    text = " ".join(text.split())[:160]
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
