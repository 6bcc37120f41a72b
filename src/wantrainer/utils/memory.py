"""Memory of this process and its children, as the system counts it (Linux ``/proc``; None elsewhere).

``process_tree_pss`` sums the proportional set size (PSS) of this process and every live descendant (data-loader
workers, the forkserver): a page shared by N of them counts 1/N in each, so the sum is what the tree costs, and
unlike a sum of RSS it does not count shared pages (libraries, memory inherited over fork) twice.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
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


MMAP_THRESHOLD = 64 * 1024
"""Blocks of at least this many bytes are mapped on their own by the C allocator (``release_freed_blocks``)."""

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def release_freed_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make the C allocator give freed blocks of ``threshold`` bytes or more back to the system at once (glibc
    only; True when applied): ``release_freed_memory``.

    glibc serves a request of at least ``M_MMAP_THRESHOLD`` bytes with a mapping of its own, which ``free``
    returns to the system; by default it raises that threshold (up to 32 MiB) each time such a block is freed, so
    after the first steps the step's tensors are carved from the heap, whose freed holes stay resident. At the
    1.3B size on the CPU (256 tokens: most activations 64 KiB to 4 MiB) that held 1.1-1.3 GiB beyond the live
    tensors; a fixed 64 KiB threshold removes it (a 4 MiB one removes 0.1 GiB), at the price of mapping and
    faulting in every such tensor afresh: steps up to 1.4-1.7x slower there (docs/benchmarks.md).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


__all__ = ["child_pids", "peak_rss_bytes", "process_tree_pss", "pss_bytes", "release_freed_blocks", "rss_bytes"]
