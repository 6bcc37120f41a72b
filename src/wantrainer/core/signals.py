"""SIGINT / SIGTERM for the whole ``train`` command: start-up, the loop, the saves and shutdown.

Phases of one ``StopRequest``:

- ``starting`` (loading models, before the first step): nothing is trained yet, so a signal stops at once
  (``Interrupted``; exit 130 for SIGINT, 143 for SIGTERM) and nothing is written.
- ``training``: the first signal asks the loop to finish the current step, save a state and return; a second
  SIGINT stops at once without saving (the newest complete save stays as it was, saves being atomic).
- inside ``deferred()`` (every save): no signal interrupts the write; a second SIGINT received there stops the
  run right after the save is complete.
- ``done`` (after the final save): signals are ignored, and stay ignored while the interpreter shuts down, so
  a late Ctrl-C never prints "Exception ignored in atexit callback".
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import threading
from collections.abc import Iterator

from ..common.logger import get_logger

logger = get_logger(__name__)

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
_EXIT_GUARD_REGISTERED = False


class Interrupted(KeyboardInterrupt):
    """Stop now (start-up, or a second Ctrl-C); ``exit_code`` is 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = EXIT_CODES.get(signal_name, 130)


def interruption_in(exc: BaseException) -> Interrupted | None:
    """The ``Interrupted`` that caused ``exc``, if any: a library can wrap a signal raised inside its own code
    (pydantic reports it as a serialization error), which must still end the run as the signal, not as a crash."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, Interrupted):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(sig, signal.SIG_IGN)


class StopRequest:
    """A flag set by a signal handler and read by the loop between steps."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self.phase = "training"
        """"starting", "training" or "done" (see the module docstring)."""
        self._deferring = 0
        self._abort_after_save: str | None = None

    @property
    def exit_code(self) -> int:
        """The exit code of a run that stopped on this request (130 SIGINT, 143 SIGTERM)."""
        return EXIT_CODES.get(self.signal_name or "SIGINT", 130)

    def request(self, name: str = "request") -> None:
        self.requested = True
        self.signal_name = name

    def _handler(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.phase == "done":
            logger.warning("%s received: the run has already saved its files and is exiting", name)
            return
        if self._deferring:
            if self.requested and signum == signal.SIGINT:
                self._abort_after_save = name
                logger.warning("second %s: the save in progress is finished first, then the run stops", name)
            else:
                self.request(name)
                logger.warning("%s received while saving: the save is finished first", name)
            return
        if self.phase == "starting":
            self.request(name)
            raise Interrupted(name, f"{name} before training started: nothing was trained or saved")
        if self.requested and signum == signal.SIGINT:
            logger.warning("second %s: stopping now without saving; the newest complete save is kept", name)
            raise Interrupted(name, f"second {name}: stopped without saving")
        self.request(name)
        logger.warning("%s received: finishing the current step, then saving the state", name)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """No signal interrupts the block (a save); a second Ctrl-C in it stops the run once it is done."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if not self._deferring and self._abort_after_save is not None:
            name, self._abort_after_save = self._abort_after_save, None
            raise Interrupted(name, f"second {name}: stopped after the save in progress")

    def finish(self) -> None:
        """The run's files are written: ignore signals from now on, also during interpreter shutdown."""
        global _EXIT_GUARD_REGISTERED
        self.phase = "done"
        if not _EXIT_GUARD_REGISTERED:
            atexit.register(_ignore_signals)  # runs before the atexit callbacks registered earlier (LIFO)
            _EXIT_GUARD_REGISTERED = True

    def is_installed(self) -> bool:
        return threading.current_thread() is threading.main_thread() and all(
            getattr(signal.getsignal(sig), "__self__", None) is self for sig in (signal.SIGINT, signal.SIGTERM)
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Install the handlers for the duration of the block (main thread only; nested blocks are no-ops)."""
        if threading.current_thread() is not threading.main_thread() or self.is_installed():
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
