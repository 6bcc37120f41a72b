"""CLI commands started from the page: each one a subprocess of ``wantrainer``, never run in the server.

One run at a time per output folder: a second start is refused while the UI's own run there is alive, and a
``train`` is refused early when the folder's lock file (``{output_dir}/.{output_name}.lock``, held by the CLI
for a whole ``train``) names a live process; the CLI's lock stays the authority for anything started elsewhere.
Stop sends SIGINT: ``train`` finishes the step, saves a state and exits 130. The output (stdout and stderr) is
kept line by line; the progress line (step/total, ETA, loss, lr) is parsed from it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config_parser import load_config
from ..core.run_folder import lock_path
from ..errors import UserError

COMMANDS = ("validate", "doctor", "estimate", "cache-latents", "cache-text", "train")
READ_ONLY = frozenset({"validate", "estimate"})
"""Commands that write nothing: they run beside a training run of the same folder."""
MAX_LINES = 5000
PROGRESS_INTERVAL_S = "1"
"""How often the CLI writes its progress line when its output is not a terminal (seconds)."""

# A Stop (SIGINT) while the child still imports torch would meet Python's own handler, a KeyboardInterrupt
# traceback from inside an import: the page sends it only once the CLI's main() says, through a pipe
# (WANTRAINER_READY_FD), that it handles Ctrl-C itself; a stop asked for before that waits.

# tqdm's line: "steps:  50%|#####     | 30/60 [00:10<00:10,  2.99step/s, loss=0.1234, lr=1.00e-02]"
_PROGRESS = re.compile(r"(?P<desc>[\w-]+):\s*(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*"
                       r"\[(?P<elapsed>[\d:]+)<(?P<eta>[\d:?]+)(?:,\s*(?P<rate>[^,\]]+))?(?:,\s*(?P<post>[^\]]*))?\]")


class RunBusy(UserError):
    """The output folder is in use (HTTP 409)."""


def parse_progress(line: str) -> dict[str, Any] | None:
    """The fields of a progress line, or None: ``{"step", "total", "eta", "elapsed", "rate", "loss", "lr", ...}``."""
    found = _PROGRESS.search(line)
    if not found:
        return None
    info: dict[str, Any] = {"bar": found["desc"], "step": int(found["n"]), "total": int(found["total"]),
                            "elapsed": found["elapsed"], "eta": found["eta"], "rate": (found["rate"] or "").strip()}
    for pair in (found["post"] or "").split(","):
        key, sep, value = pair.strip().partition("=")
        if sep:
            info[key] = value.strip()
    return info


def live_lock(output_dir: Path, output_name: str) -> dict[str, Any] | None:
    """The lock file's content when it names a process that is alive on this host (or on another host)."""
    path = lock_path(output_dir, output_name)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"path": str(path)}
    pid = info.get("pid")
    if info.get("host") == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # stale: the CLI takes it over
        except PermissionError:
            pass
    return {**info, "path": str(path)}


@dataclass
class Run:
    id: int
    command: str
    config: str
    output_dir: str
    output_name: str
    proc: subprocess.Popen
    started: float = field(default_factory=time.time)
    lines: list[str] = field(default_factory=list)
    first_line: int = 0
    """Index of ``lines[0]`` in the whole output (older lines are dropped beyond ``MAX_LINES``)."""
    progress: dict[str, Any] = field(default_factory=dict)
    stop_requested: bool = False
    ready: bool = False
    """The child's main() handles Ctrl-C: a SIGINT now is the CLI's stop (see ``cli.main``)."""
    ended: float | None = None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    @property
    def status(self) -> str:
        rc = self.returncode
        if rc is None:
            return "stopping" if self.stop_requested else "running"
        # -2 / -15: the signal came before Python had set its handlers (nothing started yet)
        return {0: "done", 130: "stopped", 143: "stopped", -2: "stopped", -15: "stopped", 2: "refused"}.get(rc, "failed")

    def view(self, since: int = 0) -> dict[str, Any]:
        start = max(since - self.first_line, 0)
        return {"id": self.id, "command": self.command, "config": self.config, "output_dir": self.output_dir,
                "output_name": self.output_name, "pid": self.proc.pid, "status": self.status,
                "returncode": self.returncode, "started": self.started, "ended": self.ended,
                "progress": self.progress, "lines": self.lines[start:],
                "next": self.first_line + len(self.lines)}


class RunManager:
    """The runs started by this server (the newest first in ``list``)."""

    def __init__(self, python: str | None = None):
        self.python = python or sys.executable
        self.runs: dict[int, Run] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def _busy(self, output_dir: str, output_name: str, command: str) -> None:
        if command in READ_ONLY:
            return
        for run in self.runs.values():
            if run.output_dir == output_dir and run.command not in READ_ONLY and run.returncode is None:
                raise RunBusy(f"{output_dir} is in use by `{run.command}` (run {run.id}, pid {run.proc.pid}, started "
                              "from this page); stop it or wait for it to end")
        if command == "train":
            held = live_lock(Path(output_dir), output_name)
            if held:
                raise RunBusy(f"{output_dir} is in use: process {held.get('pid', '?')} on host {held.get('host', '?')} "
                              f"holds its lock ({held['path']}); stop that run first")

    def start(self, command: str, config: Path, extra: list[str] | None = None) -> Run:
        if command not in COMMANDS:
            raise UserError(f"unknown command {command!r}: one of {', '.join(COMMANDS)}")
        cfg = load_config(config)  # ConfigError (exit 2 in the CLI): refuse before starting anything
        output_dir = str(Path(cfg.saving.output_dir).resolve())
        with self._lock:
            self._busy(output_dir, cfg.saving.output_name, command)
            ready_read, ready_write = os.pipe()
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANTRAINER_PROGRESS_INTERVAL": PROGRESS_INTERVAL_S,
                   "WANTRAINER_READY_FD": str(ready_write)}
            argv = [self.python, "-m", "wantrainer.cli", command, "--config", str(config), *(extra or [])]
            try:
                proc = subprocess.Popen(argv, cwd=str(config.parent), env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                        pass_fds=(ready_write,))
            except BaseException:
                os.close(ready_read)
                raise
            finally:
                os.close(ready_write)
            run = Run(next(self._ids), command, str(config), output_dir, cfg.saving.output_name, proc)
            self.runs[run.id] = run
        threading.Thread(target=self._read, args=(run,), daemon=True, name=f"ui-run-{run.id}").start()
        threading.Thread(target=self._await_ready, args=(run, ready_read), daemon=True,
                         name=f"ui-ready-{run.id}").start()
        return run

    def _await_ready(self, run: Run, fd: int) -> None:
        """Wait for the child's "main() runs now" byte (or its end), then deliver a stop asked for meanwhile."""
        try:
            os.read(fd, 1)
        finally:
            os.close(fd)
        with self._lock:
            run.ready = True
            if run.stop_requested and run.returncode is None:
                run.proc.send_signal(signal.SIGINT)

    def _read(self, run: Run) -> None:
        assert run.proc.stdout is not None
        pending = b""
        while True:
            chunk = run.proc.stdout.read1(65536) if hasattr(run.proc.stdout, "read1") else run.proc.stdout.read(4096)
            if not chunk:
                break
            pending += chunk
            *complete, pending = re.split(rb"[\r\n]", pending)
            for raw in complete:
                self._add_line(run, raw.decode("utf-8", "replace"))
        if pending:
            self._add_line(run, pending.decode("utf-8", "replace"))
        run.proc.wait()
        run.ended = time.time()
        self._add_line(run, f"[exit code {run.proc.returncode}: {run.status}]")

    def _add_line(self, run: Run, line: str) -> None:
        line = line.rstrip()
        if not line:
            return
        progress = parse_progress(line)
        if progress is not None and progress["bar"] == "steps":
            run.progress = progress
        run.lines.append(line)
        if len(run.lines) > MAX_LINES:
            drop = len(run.lines) - MAX_LINES
            del run.lines[:drop]
            run.first_line += drop

    def get(self, run_id: int) -> Run:
        run = self.runs.get(run_id)
        if run is None:
            raise UserError(f"no run {run_id}")
        return run

    def stop(self, run_id: int) -> Run:
        """SIGINT (the CLI's Ctrl-C): ``train`` saves a state at the end of the step and exits 130."""
        run = self.get(run_id)
        with self._lock:
            if run.returncode is None and not run.stop_requested:
                run.stop_requested = True
                if run.ready:  # else _await_ready sends it once the CLI's main() runs
                    run.proc.send_signal(signal.SIGINT)
        return run

    def list(self) -> list[Run]:
        return sorted(self.runs.values(), key=lambda r: r.id, reverse=True)

    def stop_all(self, timeout: float = 120.0) -> None:
        """At server shutdown: ask every live run to save and stop, and wait for them."""
        live = [r for r in self.runs.values() if r.returncode is None]
        for run in live:
            self.stop(run.id)
        deadline = time.time() + timeout
        for run in live:
            try:
                run.proc.wait(max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                run.proc.kill()
