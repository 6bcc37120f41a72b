"""Atomic file writes: write to a temp file in the same folder, fsync, then rename over the target.

Every file the project writes goes through ``atomic_path``, so two rules hold everywhere:

- the finished file has the permissions of the user's umask (``0o666 & ~umask``, as ``open()`` would give it),
  not the ``0o600`` of a temporary file, so a ComfyUI running as another user can read a LoRA;
- a full disk or quota while writing is a ``DiskFullError`` (a ``UserError``, exit 2) naming the file; the
  temporary file is removed and the target is left as it was. safetensors and ``torch.save`` report ENOSPC
  as their own exception types (``SafetensorError``, ``RuntimeError``), which are recognised here too.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UserError

TMP_SUFFIX = ".tmp"
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_WORDS = ("no space left", "disk quota exceeded", "os error 28", "os error 122")
_WRITE_FAILED_WORDS = ("file write failed", "iostream error", "unexpected pos")
"""What ``torch.save`` says when a write fails (it does not say why): disk full when little space is left."""
_LOW_FREE_BYTES = 1 << 20


class DiskFullError(UserError):
    """No space (or quota) left while writing a file; the earlier files are unchanged."""

    def __init__(self, target: Path, detail: str):
        self.target = Path(target)
        super().__init__(
            f"no space left in {self.target.parent} while writing {self.target.name} ({detail}); earlier files are "
            "unchanged: free some space (or lower save_last_n_steps / save_last_n_epochs), then run the command "
            "again (train continues from its newest state with auto_resume = true)"
        )


@functools.cache
def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file under this process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether ``exc`` raised while writing into ``folder`` means the disk (or quota) is full."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    if not isinstance(exc, (OSError, RuntimeError)) and type(exc).__name__ != "SafetensorError":
        return False
    text = str(exc).lower()
    if any(word in text for word in _DISK_FULL_WORDS):
        return True
    if any(word in text for word in _WRITE_FAILED_WORDS):
        try:
            return shutil.disk_usage(folder).free < _LOW_FREE_BYTES
        except OSError:
            return True
    return False


def disk_full_detail(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target`` atomically.

    On any exception the temporary file is removed and ``target`` is left untouched; a full disk becomes a
    ``DiskFullError``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, target)
    except Exception as exc:
        if is_disk_full(exc, target.parent):
            raise DiskFullError(target, disk_full_detail(exc)) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], target: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` with an atomic rename; tensors are made contiguous first."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def torch_save_atomic(obj: object, target: str | Path) -> None:
    """``torch.save`` with an atomic rename (read back with ``torch.load(weights_only=True)``)."""
    with atomic_path(target) as tmp:
        torch.save(obj, tmp)


def write_text_atomic(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: str | Path, obj: object) -> None:
    write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=True, default=str))
