"""The C allocator a training process runs with (``memory_allocator``): glibc's own, jemalloc or tcmalloc.

jemalloc and tcmalloc replace ``malloc`` / ``free`` only when they are loaded before everything else, so
``wantrainer train`` restarts itself (``os.execve``: the same process id, arguments and environment) with the
library named in ``LD_PRELOAD`` when the config asks for one that this process does not already run with.
``ALLOCATOR_MARK`` in the environment says a restart was made, so it is never tried twice.

Both keep freed blocks in size classes and reuse them, where glibc, after its first steps, carves the step's
tensors from one heap whose freed holes stay resident (see ``utils.memory.release_freed_blocks``); at the 1.3B
size on the CPU they hold 1.2 GiB less at the same step time (``docs/memory.md``).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from ..errors import ConfigError

ALLOCATOR_MARK = "WANTRAINER_ALLOCATOR"
"""Set to the allocator's name in the environment of a process restarted with it."""

_LIBRARIES = {"jemalloc": ("jemalloc",), "tcmalloc": ("tcmalloc_minimal", "tcmalloc")}
"""Allocator -> library names (``lib<name>.so*``), the preferred first."""
_PACKAGES = {"jemalloc": "libjemalloc2", "tcmalloc": "libtcmalloc-minimal4"}
"""Allocator -> its Debian / Ubuntu package."""
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                 "/usr/local/lib")  # fmt: skip


def supported() -> bool:
    """Preloading a library needs Linux (the dynamic loader's ``LD_PRELOAD``)."""
    return platform.system() == "Linux"


def search_dirs() -> list[Path]:
    """Where a library is looked for: the active Python environment's ``lib`` (conda), then the system's."""
    dirs = [Path(sys.prefix) / "lib"]
    if os.environ.get("CONDA_PREFIX"):
        dirs.append(Path(os.environ["CONDA_PREFIX"]) / "lib")
    return dirs + [Path(d) for d in _LIBRARY_DIRS]


def find_library(name: str, dirs: list[Path] | None = None) -> Path | None:
    """The shared library of allocator ``name`` ("jemalloc" / "tcmalloc"), or None when none is installed."""
    for base in _LIBRARIES[name]:
        for folder in search_dirs() if dirs is None else dirs:
            found = sorted(folder.glob(f"lib{base}.so*"), key=lambda p: (len(p.name), p.name))
            if found:
                return found[0]
    return None


def loaded_allocator(maps: Path = Path("/proc/self/maps")) -> str | None:
    """The allocator library mapped into this process ("jemalloc" / "tcmalloc"), or None (glibc's own)."""
    try:
        text = maps.read_text()
    except OSError:
        return None
    for name, bases in _LIBRARIES.items():
        if any(f"/lib{base}.so" in text for base in bases):
            return name
    return None


def missing_message(name: str) -> str:
    dirs = ", ".join(str(d) for d in search_dirs())
    return (f'memory_allocator = "{name}": no lib{_LIBRARIES[name][0]}.so was found (looked in {dirs}); '
            f"install it (Debian / Ubuntu: apt install {_PACKAGES[name]}; conda: conda install "
            f'-c conda-forge {"jemalloc" if name == "jemalloc" else "gperftools"}) or set memory_allocator = '
            '"system"')  # fmt: skip


def _preload_needed(name: str) -> bool:
    """Allocator ``name`` is not the system's, can be preloaded here, and this process does not run with it."""
    return name != "system" and supported() and loaded_allocator() != name


def allocator_problem(name: str) -> str | None:
    """What stops ``train`` from running with allocator ``name`` (weight-free, for ``validate``), or None."""
    if not _preload_needed(name):
        return None
    return None if find_library(name) else missing_message(name)


def preload_environment(name: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with allocator ``name``'s library first in ``LD_PRELOAD`` and the mark
    set; a ``ConfigError`` when it is not installed."""
    env = dict(os.environ if env is None else env)
    library = find_library(name)
    if library is None:
        raise ConfigError(missing_message(name))
    others = [p for p in env.get("LD_PRELOAD", "").split(":") if p and p != str(library)]
    env["LD_PRELOAD"] = ":".join([str(library), *others])
    env[ALLOCATOR_MARK] = name
    return env


def restart_with(name: str) -> None:
    """Replace this process by the same command with allocator ``name`` preloaded, unless it already runs with
    it (or is not on Linux, or was restarted for it once: then it returns and the caller warns). Call it before
    anything starts threads, opens process groups or writes files: nothing after it in this process runs."""
    if not _preload_needed(name) or os.environ.get(ALLOCATOR_MARK):
        return
    env = preload_environment(name)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)


def effect_warning(name: str) -> str | None:
    """Why allocator ``name`` is not in effect in this process (a warning for the log), or None when it is."""
    if name == "system" or loaded_allocator() == name:
        return None
    if not supported():
        return (f'memory_allocator = "{name}" has no effect here (preloading a library needs Linux); training goes '
                "on with the system's allocator")  # fmt: skip
    if os.environ.get(ALLOCATOR_MARK) == name:
        return (f'memory_allocator = "{name}": this process was restarted with it in LD_PRELOAD but does not run '
                "with it (the loader ignored the library?); training goes on with the system's allocator")
    return (f'memory_allocator = "{name}" is applied by the `wantrainer train` command, which restarts itself with '
            f"the library preloaded; this process was started otherwise and runs with the system's allocator (start "
            f"it with LD_PRELOAD={find_library(name) or 'lib' + _LIBRARIES[name][0] + '.so'})")


__all__ = ["ALLOCATOR_MARK", "allocator_problem", "effect_warning", "find_library", "loaded_allocator",
           "preload_environment", "restart_with", "supported"]
