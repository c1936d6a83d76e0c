"""`omlx serve` also writes its log to `$OMLX_HOME/logs/server.log`, rotated at midnight
(`server.log.YYYY-MM-DD`) and kept for a number of days, as oMLX does.  oMLX's environment
names choose the folder and the retention: `OMLX_LOG_DIR`, `OMLX_LOG_RETENTION_DAYS` (7)."""

from __future__ import annotations

import logging
import os
from logging.handlers import TimedRotatingFileHandler
from pathlib import Path

DEFAULT_RETENTION_DAYS = 7
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_files(home: Path) -> Path | None:
    """Add the rotating file handler to the root logger; returns the log file (None if the
    folder cannot be written: the server still runs, logging to stderr)."""
    folder = Path(os.environ.get("OMLX_LOG_DIR") or home / "logs").expanduser()
    try:
        days = int(os.environ.get("OMLX_LOG_RETENTION_DAYS") or DEFAULT_RETENTION_DAYS)
    except ValueError:
        days = DEFAULT_RETENTION_DAYS
    path = folder / "server.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handler = TimedRotatingFileHandler(path, when="midnight", backupCount=max(days, 1), encoding="utf-8")
    except OSError as exc:
        logging.getLogger("omlx").warning("not logging to %s: %s", path, exc)
        return None
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    return path
