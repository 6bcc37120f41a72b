"""Commands printed for the user to type: they must work as printed, in a shell where the environment that
runs wantrainer is not activated."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def console_command(name: str) -> str:
    """``name`` when the shell finds this environment's own ``name``; else the full path of that script."""
    own = Path(sys.executable).parent / name
    if not own.exists():
        return name
    found = shutil.which(name)
    if found is not None and Path(found).resolve() == own.resolve():
        return name
    return str(own)


def activation_hint() -> str | None:
    """How to make ``wantrainer`` a plain command in this shell, or None when it already is."""
    if console_command("wantrainer") == "wantrainer":
        return None
    activate = Path(sys.executable).parent / "activate"
    return f"to type `wantrainer` and `tensorboard` directly: source {activate}" if activate.exists() else None
