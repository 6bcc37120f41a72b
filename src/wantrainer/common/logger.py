"""Levelled logging with one format for the whole package.

Library code calls ``get_logger(__name__)`` and never ``print``; the CLI calls ``setup_logging`` once with
``logging_level`` from the config.
"""

from __future__ import annotations

import logging
import sys

_ROOT = "wantrainer"
_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_DATEFMT = "%H:%M:%S"


def get_logger(name: str) -> logging.Logger:
    """Return a logger under the ``wantrainer`` hierarchy."""
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)


def setup_logging(level: str | int = "INFO") -> None:
    """Install one stderr handler on the package root logger (idempotent) and set its level."""
    root = logging.getLogger(_ROOT)
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    root.setLevel(level)
    if not any(getattr(h, "_wantrainer", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
        handler._wantrainer = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False
