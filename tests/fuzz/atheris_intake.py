"""Coverage-guided fuzzing of image intake with atheris (libFuzzer), beside the hypothesis properties; not collected
by pytest. Every input must decode to an RGB image within the encoder's default limits or raise InvalidImageError;
anything else is a crash that libFuzzer saves (crash-<sha1>) and reports. Hangs are caught by libFuzzer's -timeout.

    .venv/bin/python tests/fuzz/atheris_intake.py -atheris_runs=200000 -timeout=10 -max_len=65536 \
        -rss_limit_mb=4096 /tmp/intake-corpus

An empty corpus directory is first filled with the seed corpus (examples/cat.jpg and Pillow-made PNG, GIF, WebP,
BMP, JPEG and TIFF files, tests/fuzz/support.py), so the fuzzer starts from real files of every format.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

with atheris.instrument_imports(include=["PIL", "common"]):
    # Pillow imports its format plugins lazily, on the first open: import them here so they are instrumented.
    from PIL import BmpImagePlugin, GifImagePlugin, ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin  # noqa: F401

    from common.config import EncoderConfig, ModelConfig
    from common.images.errors import InvalidImageError
    from common.images.intake import decode_image
    from encoder_service.server import image_limits

LIMITS = image_limits(EncoderConfig(model=ModelConfig(model="unused")))


def test_one_input(data: bytes) -> None:
    try:
        image = decode_image(data, LIMITS)
    except InvalidImageError:
        return
    width, height = image.size
    if image.mode != "RGB" or width * height > LIMITS.max_pixels or max(width, height) > LIMITS.max_side:
        raise AssertionError(f"decoded outside the limits: mode {image.mode}, {width} x {height}")


def fill_empty_corpus(argv: list[str]) -> None:
    """Write the seed corpus into the first corpus directory on the command line when it is empty."""
    from tests.fuzz.support import seed_corpus

    directories = [Path(arg) for arg in argv[1:] if not arg.startswith("-")]
    if directories and directories[0].is_dir() and not any(directories[0].iterdir()):
        for name, data in seed_corpus().items():
            (directories[0] / name).write_bytes(data)


def main() -> None:
    fill_empty_corpus(sys.argv)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
