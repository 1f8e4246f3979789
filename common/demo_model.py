"""Build a random-weight checkpoint of any supported model family in the standard Hugging Face layout.

    python -m common.demo_model OUT_DIR [--family F] [--vision V] [--text T] [--size tiny|bench] [--seed N]

    F: llava, llava_next, blip2, instructblip, qwen2_vl, qwen2_5_vl, gemma3, idefics3, smolvlm (--help lists them)

Tests, the demo and benchmarks use these checkpoints because no weights can be downloaded here; the builders are
in `common/demo_checkpoints/`.
"""

from __future__ import annotations

import argparse

from common.demo_checkpoints import BUILDERS, build_checkpoint
from common.demo_checkpoints.parts import SIZE_PRESETS

__all__ = ["build_checkpoint", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m common.demo_model",
        description="Build a random-weight vision-language checkpoint (Hugging Face layout) for tests, demos and "
        "benchmarks.",
    )
    parser.add_argument("out_dir", help="directory to write the checkpoint to (created if missing)")
    parser.add_argument("--family", choices=tuple(BUILDERS), default="llava", help="model family (default: llava)")
    parser.add_argument(
        "--vision", help="vision tower: clip or siglip (blip for blip2/instructblip); default: the family's usual one"
    )
    parser.add_argument(
        "--text", help="language model: llama, qwen2, mistral or opt (by family); default: the family's usual one"
    )
    parser.add_argument(
        "--size", choices=tuple(SIZE_PRESETS), default="tiny", help="tiny (tests) or bench (benchmarks); default tiny"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights (default: 0)")
    args = parser.parse_args(argv)
    options = {"vision": args.vision} if args.vision else {}
    try:
        out = build_checkpoint(
            args.out_dir, family=args.family, text=args.text, size=args.size, seed=args.seed, **options
        )
    except ValueError as exc:
        parser.error(str(exc))
    text = args.text or BUILDERS[args.family][1]
    print(f"wrote {args.size} {args.family} checkpoint ({args.vision or 'default vision'} + {text}, seed {args.seed}) "
          f"to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
