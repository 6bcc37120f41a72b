"""The command layer of the caching commands: config, logging, a tqdm progress bar and the final summary."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..common.logger import get_logger, setup_logging
from .common import CacheSummary

logger = get_logger(__name__)


class TqdmProgress:
    """Progress bar with items/s and ETA (tqdm's default format; plain lines when stderr is not a terminal)."""

    def __init__(self) -> None:
        self._bar = None

    def start(self, total: int, description: str) -> None:
        from ..common.progress import progress_bar

        self._bar = progress_bar(total=total, desc=description, unit="item")

    def advance(self, count: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def run_caching(args: argparse.Namespace, cache: Callable[..., CacheSummary], name: str) -> int:
    """Load ``args.config``, run ``cache(cfg, progress)`` and log the summary. Exit code 0 (failures are listed)."""
    from ..config_parser import load_config

    cfg = load_config(args.config)
    setup_logging(cfg.logging.logging_level)
    summary = cache(cfg, TqdmProgress())
    for line in summary.lines():
        (logger.warning if line.lstrip().startswith("failed") else logger.info)("%s", line)
    return 0
