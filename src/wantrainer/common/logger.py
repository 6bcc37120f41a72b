"""Levelled logging with one format for the whole package.

Library code calls ``get_logger(__name__)`` and never ``print``; the CLI calls ``setup_logging`` once with
``logging_level`` from the config.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from tqdm import tqdm

_ROOT = "wantrainer"
_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_DATEFMT = "%H:%M:%S"


def get_logger(name: str) -> logging.Logger:
    """Return a logger under the ``wantrainer`` hierarchy."""
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)


class _BarAwareHandler(logging.StreamHandler):
    """Writes through ``tqdm.write``, so a message printed while a progress bar is live on the terminal gets a
    line of its own and the bar is redrawn below it. Without a stream it writes to ``sys.stderr`` as it is at
    each message (a redirection made after setup, e.g. by a test harness, is followed)."""

    def __init__(self, stream: TextIO | None = None):
        super().__init__(stream or sys.stderr)
        self._follow_stderr = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        if self._follow_stderr:
            self.stream = sys.stderr
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise; same policy as StreamHandler.emit
            self.handleError(record)


def setup_logging(level: str | int = "INFO") -> None:
    """Install one stderr handler on the package root logger (idempotent) and set its level."""
    root = logging.getLogger(_ROOT)
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    root.setLevel(level)
    if not any(getattr(h, "_wantrainer", False) for h in root.handlers):
        handler = _BarAwareHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
        handler._wantrainer = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False
