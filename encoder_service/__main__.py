"""`python -m encoder_service --model PATH_OR_ID [...]`: run one encoder replica until SIGTERM/SIGINT.

Every flag can also be set as an `MMSERVE_*` environment variable (`--help` lists both). Exit codes:
0 after a graceful shutdown, 2 for an invalid setting or an unusable checkpoint (the message says which).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from common.checkpoint import CheckpointError
from common.config import ConfigError, encoder_config_from_args
from encoder_service.server import serve


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = encoder_config_from_args(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(config))
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
