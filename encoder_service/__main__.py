"""`python -m encoder_service --model PATH_OR_ID [...]`: run one encoder replica until SIGTERM/SIGINT.

Every flag can also be set as an `MMSERVE_*` environment variable (`--help` lists both). Exit codes:
0 after a graceful shutdown, 2 for an invalid setting or an unusable checkpoint (the message says which).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from common.config import encoder_config_from_args
from common.serving import cli_main
from encoder_service.server import serve


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(encoder_config_from_args, serve, argv, configure_logging=_configure_logging)


if __name__ == "__main__":
    raise SystemExit(main())
