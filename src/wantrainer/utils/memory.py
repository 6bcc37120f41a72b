"""Memory of this process and its children, as the system counts it (Linux ``/proc``; None elsewhere).

``process_tree_pss`` sums the proportional set size (PSS) of this process and every live descendant (data-loader
workers, the forkserver): a page shared by N of them counts 1/N in each, so the sum is what the tree costs, and
unlike a sum of RSS it does not count shared pages (libraries, memory inherited over fork) twice.
"""

from __future__ import annotations

import os
from pathlib import Path

_PROC = Path("/proc")


def _status_kib(pid: int | str, field: str) -> int | None:
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident set size of one process."""
    kib = _status_kib(pid, "VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """Peak resident set size of one process (VmHWM: its own, not inherited from a parent over fork)."""
    kib = _status_kib(pid, "VmHWM")
    return None if kib is None else kib * 1024


def pss_bytes(pid: int | str = "self", field: str = "Pss") -> int | None:
    """Proportional set size of one process (``/proc/PID/smaps_rollup``); ``field`` may also be e.g. "Rss"."""
    try:
        for line in (_PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def child_pids(pid: int | None = None) -> list[int]:
    """Every live descendant of ``pid`` (default: this process), children before grandchildren."""
    root = os.getpid() if pid is None else pid
    parents: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        ppid = _status_kib(entry.name, "PPid")  # the same "Field: value" parser
        if ppid is not None:
            parents.setdefault(ppid, []).append(int(entry.name))
    found, frontier = [], [root]
    while frontier:
        children = [c for p in frontier for c in parents.get(p, [])]
        found.extend(children)
        frontier = children
    return found


def process_tree_pss(pid: int | None = None) -> int | None:
    """PSS of ``pid`` (default: this process) plus all its live descendants, in bytes; None without /proc."""
    own = pss_bytes(pid if pid is not None else "self")
    if own is None:
        return None
    return own + sum(pss_bytes(child) or 0 for child in child_pids(pid))


__all__ = ["child_pids", "peak_rss_bytes", "process_tree_pss", "pss_bytes", "rss_bytes"]
