"""SIGINT / SIGTERM during training: finish the current step, save state, exit cleanly.

A second SIGINT (Ctrl-C twice) interrupts immediately, without saving.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from ..common.logger import get_logger

logger = get_logger(__name__)


class StopRequest:
    """A flag set by a signal handler and read by the loop between steps."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None

    def request(self, name: str = "request") -> None:
        self.requested = True
        self.signal_name = name

    def _handler(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            logger.warning("second %s: stopping now without saving", name)
            raise KeyboardInterrupt
        self.request(name)
        logger.warning("%s received: finishing the current step, then saving the state", name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Install the handlers for the duration of the block (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
