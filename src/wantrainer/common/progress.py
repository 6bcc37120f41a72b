"""Progress bars for the commands (CLI layer): a live tqdm bar on a terminal, plain log lines otherwise.

A bar redrawn with carriage returns turns a log file (``wantrainer train ... > train.log 2>&1``, nohup, a job
scheduler) into one enormous line. When stderr is not a terminal the same tqdm text is written as one ordinary
line every ``LOG_INTERVAL_S`` seconds instead (and once at the end).
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0
"""Seconds between progress lines when stderr is not a terminal (``WANTRAINER_PROGRESS_INTERVAL`` overrides it:
the web UI reads the progress from these lines and asks for one a second)."""


def _log_interval() -> float:
    try:
        return max(float(os.environ.get("WANTRAINER_PROGRESS_INTERVAL", LOG_INTERVAL_S)), 0.1)
    except ValueError:
        return LOG_INTERVAL_S


class _LineWriter:
    """A file for tqdm that turns each redraw (``\\r`` + text) into one line of its own."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _interactive(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


def progress_bar(stream: TextIO | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on ``stream`` (default stderr): live on a terminal, a line every ``LOG_INTERVAL_S`` otherwise."""
    stream = stream or sys.stderr
    if _interactive(stream):
        from tqdm.auto import tqdm as auto_tqdm

        return auto_tqdm(file=stream, dynamic_ncols=True, **kwargs)
    kwargs.setdefault("mininterval", _log_interval())
    return tqdm(file=_LineWriter(stream), ncols=120, **kwargs)
