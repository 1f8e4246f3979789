"""Random-weight checkpoints in the Hugging Face layout, one builder per model family (no downloads here).

    build_checkpoint(out_dir, family="llava", vision="clip", text="llama", size="tiny", seed=0, **options)

Tests, the demo and the benchmarks use them: each loads offline with the HF auto classes and the family's own
processor, like a hub checkpoint of that family. To add a family's builder: a module here with a function like
`build(out_dir, *, vision, text, size, seed, **options) -> Path`, and its entry in `BUILDERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.demo_checkpoints import blip2, gemma3, idefics3, llava, llava_next, qwen2_vl

Builder = Callable[..., Path]

# family name -> (builder, its default language model)
BUILDERS: dict[str, tuple[Builder, str]] = {
    "llava": (llava.LLAVA.build, "llama"),
    "blip2": (blip2.build_blip2, "opt"),
    "instructblip": (blip2.build_instructblip, "llama"),
    "llava_next": (llava_next.LLAVA_NEXT.build, "mistral"),
    "gemma3": (gemma3.build, "gemma3"),
    "idefics3": (idefics3.IDEFICS3.build, "llama"),
    "smolvlm": (idefics3.SMOLVLM.build, "llama"),
    "qwen2_vl": (qwen2_vl.QWEN2_VL.build, "qwen2"),
    "qwen2_5_vl": (qwen2_vl.QWEN2_5_VL.build, "qwen2"),
}


def build_checkpoint(out_dir: str | Path, *, family: str = "llava", text: str | None = None, **options: Any) -> Path:
    """Write a random-weight checkpoint of `family` to `out_dir` and return its path. Same arguments, same files."""
    if family not in BUILDERS:
        raise ValueError(f"family must be one of {tuple(BUILDERS)}, got {family!r}")
    builder, default_text = BUILDERS[family]
    return builder(out_dir, text=text or default_text, **options)
