"""The command layer of the caching commands: config, logging, a tqdm progress bar and the final summary."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..common.logger import get_logger
from ..errors import UserError
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
    """Load ``args.config``, run ``cache(cfg, progress)`` and log the summary. Exit code 0 when every dataset has
    cached items (failed items are listed), 2 when a dataset is left with none (a ``cache && train`` script stops)."""
    from ..config_parser import load_config_for_command
    from ..preflight import require_ready

    cfg = load_config_for_command(args)
    require_ready(cfg, name)
    summary = cache(cfg, TqdmProgress())
    for line in summary.lines():
        (logger.warning if line.lstrip().startswith(("failed", "no usable", "unmasked")) else logger.info)("%s", line)
    if summary.unusable:
        raise UserError(f"{name}: {len(summary.unusable)} dataset(s) have no usable item:\n"
                        + "\n".join(f"  - {r}" for r in summary.unusable))
    return 0
