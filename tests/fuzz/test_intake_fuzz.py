"""Image intake under arbitrary bytes: a decoded RGB image within the service's limits, or InvalidImageError with a
client-safe message; never another exception, never a hang (each example has a deadline, and a call that does not
return at all fails the test instead of blocking it)."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from common.config import EncoderConfig, ModelConfig
from common.images.errors import InvalidImageError
from common.images.intake import ImageLimits
from encoder_service.server import image_limits
from tests.fuzz.support import check_decode, fuzz_settings, mutated_images, prefixed_bytes, seed_corpus

pytestmark = pytest.mark.fuzz

SERVICE_LIMITS = image_limits(EncoderConfig(model=ModelConfig(model="unused")))  # the encoder's defaults
# Small enough that mutated headers cross them often: every limit is exercised, not only Pillow's parsers.
TIGHT_LIMITS = ImageLimits(max_bytes=4096, max_pixels=600, max_side=40)


@given(data=st.binary(max_size=4096))
@example(data=b"")
@example(data=b"\x89PNG\r\n\x1a\n")
@fuzz_settings(deadline_s=5)
def test_any_bytes(data: bytes) -> None:
    check_decode(data, SERVICE_LIMITS)


@given(data=prefixed_bytes())
@fuzz_settings(deadline_s=5)
def test_bytes_behind_a_magic_number(data: bytes) -> None:
    check_decode(data, SERVICE_LIMITS)


@given(data=mutated_images())
@fuzz_settings(deadline_s=5)
def test_mutated_real_images(data: bytes) -> None:
    check_decode(data, SERVICE_LIMITS)


@given(data=mutated_images())
@fuzz_settings(deadline_s=5)
def test_mutated_real_images_under_tight_limits(data: bytes) -> None:
    check_decode(data, TIGHT_LIMITS)


def test_the_seed_corpus_decodes() -> None:
    """The seeds are valid: every allowed format decodes (so mutations start from files that reach the decoders);
    TIFF is refused as a format."""
    for name, data in seed_corpus().items():
        outcome = check_decode(data, SERVICE_LIMITS)
        if name.endswith(".tiff"):
            assert isinstance(outcome, InvalidImageError) and "unsupported image format (TIFF)" in str(outcome)
        else:
            assert isinstance(outcome, Image.Image), (name, outcome)
