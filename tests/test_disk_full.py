"""A full disk in any write path is a user error (exit 2) that removes its temporary file or folder and keeps
the earlier saves. Real ENOSPC from a small tmpfs (mounted by the test; skipped where mounting is not allowed)."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from train_support import write_config
from wantrainer.cli import main
from wantrainer.core.checkpoint_io import find_latest_state, is_valid_state
from wantrainer.sampling.writers import write_mp4, write_png
from wantrainer.utils import atomic


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not permitted'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(folder: Path, leave: int) -> None:
    """Fill ``folder``'s file system up to ``leave`` bytes."""
    import shutil

    free = shutil.disk_usage(folder).free
    with open(folder / "filler.bin", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


WRITERS = {
    "safetensors": lambda p: atomic.save_safetensors_atomic({"w": torch.ones(64, 1024)}, p),
    "torch.save": lambda p: atomic.torch_save_atomic({"w": torch.ones(64, 1024)}, p),
    "text": lambda p: atomic.write_text_atomic(p, "x" * 300_000),
    "png": lambda p: write_png(p, np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)),
    "mp4": lambda p: write_mp4(p, np.random.default_rng(0).integers(0, 255, (9, 256, 256, 3), dtype=np.uint8)),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_every_writer_turns_enospc_into_a_user_error_and_leaves_no_temporary(tmp_path, kind):
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        suffix = {"png": ".png", "mp4": ".mp4"}.get(kind, ".bin")
        target = disk / f"out{suffix}"
        target.write_bytes(b"earlier")
        _fill(disk, 16 * 1024)
        with pytest.raises(atomic.DiskFullError, match="no space left") as info:
            WRITERS[kind](target)
        assert info.value.exit_code == 2 and target.name in str(info.value)
        assert target.read_bytes() == b"earlier"
        assert sorted(p.name for p in disk.iterdir()) == ["filler.bin", target.name]


@pytest.mark.slow
def test_train_on_a_filling_disk_exits_2_and_keeps_the_last_complete_state(train_workspace, tmp_path, capsys):
    with _tmpfs(tmp_path / "disk", "600k") as disk:
        values = train_workspace.config(disk / "out", max_train_steps=200, save_every_n_steps=1, save_state=True,
                                        log_with="none")
        config = write_config(tmp_path / "my.toml", values)
        assert main(["train", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert "no space left" in err and "Traceback" not in err
        out = disk / "out"
        assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".old"))]
        newest = find_latest_state(out, "lora")
        assert newest is not None and is_valid_state(newest)
        assert all(is_valid_state(p) for p in out.glob("lora-step*-state"))


def test_cache_latents_on_a_full_disk_exits_2(tmp_path, tiny_kit, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 60, 20, 200)).save(images / f"im{i}.png")
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        config = write_config(tmp_path / "c.toml", {"vae": str(tiny_kit.vae), "datasets": {"train": [
            {"image_directory": str(images), "cache_directory": str(disk / "cache"), "resolution": [64, 64]}]}})
        (disk / "cache").mkdir()
        _fill(disk, 2 * 1024)
        assert main(["cache-latents", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert "no space left" in err and "Traceback" not in err
        assert not [p for p in (disk / "cache").iterdir() if p.name.endswith(".tmp")]
