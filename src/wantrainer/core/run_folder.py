"""A run owns its output folder: one ``train`` per (``output_dir``, ``output_name``), never over earlier work.

- ``RunLock``: ``{output_dir}/.{output_name}.lock`` (JSON: pid, host, start time, the process's own start
  tick) is created exclusively for the whole ``train`` command and removed at its end. A lock of a process that
  is gone (same host, pid dead or reused) is taken over with a warning; a live one is a ``UserError`` naming
  the pid, host and folder.
- ``remove_stray_temporaries``: under the lock, the temporary files and folders a killed process left
  (``.{name}….safetensors.XXXX.tmp``, ``.{name}-step…-state.tmp`` / ``.old``) are removed. Only names of
  this ``output_name`` in our own temporary patterns are touched.
- ``earlier_saves`` / ``refuse_or_clear_earlier_run``: a run that starts from step 0 where saves of the same
  ``output_name`` already exist is refused (``auto_resume``, another name or folder, or ``overwrite_output``),
  or, with ``overwrite_output = true``, the earlier saves are deleted first so the folder never mixes two runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..common.logger import get_logger
from ..errors import UserError

logger = get_logger(__name__)

_EXPERT_SUFFIX = r"(?:_high_noise|_low_noise)?"


def lock_path(output_dir: Path, output_name: str) -> Path:
    return Path(output_dir) / f".{output_name}.lock"


def _process_start_tick(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks): tells a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _alive(pid: int, start_tick: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    if start_tick is None:
        return True
    now = _process_start_tick(pid)
    return now is None or now == start_tick


class RunLock:
    """The exclusive claim of one (``output_dir``, ``output_name``); a context manager."""

    def __init__(self, output_dir: Path, output_name: str):
        self.output_dir = Path(output_dir)
        self.output_name = output_name
        self.path = lock_path(self.output_dir, output_name)
        self.held = False

    def _describe(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "start_tick": _process_start_tick(pid), "output_name": self.output_name}

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if self._take_over_if_stale():
                    continue
                raise self._busy_error() from None
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self._describe(), fh)
            self.held = True
            return
        raise self._busy_error()

    def _take_over_if_stale(self) -> bool:
        info = self._read()
        if info is None:
            return True  # removed meanwhile: try again
        here = socket.gethostname()
        pid = info.get("pid")
        if info and info.get("host") == here and isinstance(pid, int) and not _alive(pid, info.get("start_tick")):
            logger.warning("%s: taking over the lock of process %d (started %s), which is no longer running",
                           self.path, pid, info.get("started", "?"))
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return True
        return False

    def _busy_error(self) -> UserError:
        info = self._read() or {}
        who = (f"process {info.get('pid', '?')} on host {info.get('host', '?')} (started {info.get('started', '?')})"
               if info else "another process")
        return UserError(
            f"{self.output_dir} is in use: {who} is training output_name \"{self.output_name}\" there (lock file "
            f"{self.path}). Wait for it or stop it (Ctrl-C saves its state), or train into another output_dir / "
            "output_name. If that process is really gone (e.g. on another machine sharing the folder), delete "
            "the lock file"
        )

    def release(self) -> None:
        if not self.held:
            return
        info = self._read() or {}
        if info.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _temporary_pattern(output_name: str) -> re.Pattern[str]:
    name = re.escape(output_name)
    return re.compile(
        rf"^\.{name}{_EXPERT_SUFFIX}(?:-[A-Za-z0-9]+)*"
        rf"(?:\.safetensors\.[A-Za-z0-9_]+\.tmp|-state\.(?:tmp|old))$"
    )


def remove_stray_temporaries(output_dir: Path, output_name: str) -> list[Path]:
    """Delete the temporary files / folders of ``output_name`` a killed process left; returns what went."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    pattern = _temporary_pattern(output_name)
    removed = []
    for path in sorted(output_dir.iterdir()):
        if not pattern.match(path.name):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        logger.warning("removed %s, left unfinished by an earlier process", path)
    return removed


def earlier_saves(output_dir: Path, output_name: str) -> list[Path]:
    """LoRA files and state folders of ``output_name`` in ``output_dir`` (final, step and epoch saves)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    from ..enhancements.registry import extra_save_suffixes

    name = re.escape(output_name)
    extras = "|".join(re.escape(s) for s in extra_save_suffixes())
    extra = f"(?:{extras})?" if extras else ""
    pattern = re.compile(rf"^{name}{_EXPERT_SUFFIX}(?:-[A-Za-z]*\d+)?{extra}(?:\.safetensors|-state)$")
    return sorted(p for p in output_dir.iterdir() if pattern.match(p.name))


def refuse_or_clear_earlier_run(saving_cfg: Any) -> None:
    """For a run starting at step 0: refuse when earlier saves exist, or delete them with ``overwrite_output``."""
    output_dir, name = Path(saving_cfg.output_dir), saving_cfg.output_name
    found = earlier_saves(output_dir, name)
    if not found:
        return
    if saving_cfg.overwrite_output:
        for path in found:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        logger.warning("overwrite_output = true: deleted %d earlier save(s) of \"%s\" in %s: %s", len(found), name,
                       output_dir, ", ".join(p.name for p in found))
        return
    states = [p for p in found if p.name.endswith("-state")]
    why = ("auto_resume = true continues from its newest state" if states else
           "it has no state folder to resume from (save_state was off), so auto_resume cannot continue it")
    shown = ", ".join(p.name for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    raise UserError(
        f"{output_dir} already holds saves of output_name \"{name}\" from an earlier run ({shown}); this run would "
        f"start at step 0 and overwrite them. Choose one: set auto_resume = true to continue that run ({why}); "
        "or set another output_name / output_dir for a new run; or set overwrite_output = true to delete the "
        "earlier saves and start again"
    )


@contextlib.contextmanager
def claim_output_folder(saving_cfg: Any, *, main_process: bool = True) -> Iterator[RunLock | None]:
    """Hold the run's lock (main process only) and clear stray temporaries for the whole block."""
    if not main_process:
        yield None
        return
    with RunLock(Path(saving_cfg.output_dir), saving_cfg.output_name) as lock:
        remove_stray_temporaries(Path(saving_cfg.output_dir), saving_cfg.output_name)
        yield lock
