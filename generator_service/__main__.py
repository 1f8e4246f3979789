"""`python -m generator_service --model PATH_OR_ID [...]`: run one generator replica until SIGTERM/SIGINT.

Every flag can also be set as an `MMSERVE_*` environment variable (`--help` lists both). Logs are JSON lines
on stderr (one object per event, with `request_id` where there is one; prompts are never logged). Exit codes:
0 after a graceful shutdown, 2 for an invalid setting or an unusable checkpoint (the message says which).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from common.config import generator_config_from_args
from common.serving import cli_main
from generator_service.server import serve

# Attributes every LogRecord has; anything else was passed with `extra=` and goes into the JSON object.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({key: value for key, value in vars(record).items() if key not in _STANDARD_ATTRS})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(generator_config_from_args, serve, argv, configure_logging=configure_logging)


if __name__ == "__main__":
    raise SystemExit(main())
