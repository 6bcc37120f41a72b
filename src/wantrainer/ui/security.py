"""Where the UI may read and write, and who may talk to it.

Every path the API receives is resolved (``~``, ``..`` and symlinks) and refused unless it lies inside one of the
folders given to ``wantrainer ui --root``. When the server listens on anything but a loopback address, each
request must carry the access token (``?token=`` once, then a cookie); on loopback no token is needed.
"""

from __future__ import annotations

import ipaddress
import secrets
from pathlib import Path

from ..errors import UserError

TOKEN_COOKIE = "wantrainer_token"


class PathRefused(UserError):
    """A path outside the allowed folders (HTTP 403)."""


class Roots:
    """The folders the UI may use, resolved once."""

    def __init__(self, folders: list[Path]):
        if not folders:
            raise UserError("wantrainer ui needs at least one folder (--root)")
        resolved = []
        for folder in folders:
            path = Path(folder).expanduser().resolve()
            if not path.is_dir():
                raise UserError(f"--root {folder}: not a folder; give an existing folder that holds your configs")
            resolved.append(path)
        self.folders = resolved

    def resolve(self, path: str | Path) -> Path:
        """``path`` resolved (relative paths against the first root); ``PathRefused`` when outside every root."""
        if path is None or str(path).strip() == "":
            raise UserError("no path given")
        candidate = Path(str(path)).expanduser()
        if not candidate.is_absolute():
            candidate = self.folders[0] / candidate
        resolved = candidate.resolve()
        if not any(resolved == root or resolved.is_relative_to(root) for root in self.folders):
            raise PathRefused(f"{path} is outside the folders this UI may use "
                              f"({', '.join(str(r) for r in self.folders)}); restart `wantrainer ui` with "
                              "--root naming its folder to use it")
        return resolved

    def display(self, path: Path) -> str:
        """``path`` relative to the root that holds it (for lists), else as is."""
        for root in self.folders:
            if path.is_relative_to(root):
                rel = path.relative_to(root).as_posix()
                return rel if len(self.folders) == 1 else f"{root.name}/{rel}"
        return str(path)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)
