"""A run owns its output folder: the lock, refusing a fresh run over earlier saves (and the three ways on),
stray temporaries of a killed process, and file permissions from the user's umask."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from train_support import load
from wantrainer.core.run_folder import (
    RunLock,
    claim_output_folder,
    earlier_saves,
    lock_path,
    remove_stray_temporaries,
)
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.errors import UserError
from wantrainer.utils import atomic


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_lock_is_a_user_error_naming_pid_host_and_folder(tmp_path):
    with RunLock(tmp_path, "lora") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(UserError) as info:
            RunLock(tmp_path, "lora").acquire()
        text = str(info.value)
        assert f"process {os.getpid()} on host {socket.gethostname()}" in text
        assert str(tmp_path) in text and 'output_name "lora"' in text and "another output_dir" in text
        with RunLock(tmp_path, "other"):  # another output_name in the same folder is another run
            pass
    assert not lock_path(tmp_path, "lora").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path, caplog):
    pid = _dead_pid()
    lock_path(tmp_path, "lora").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "x"}))
    with caplog.at_level("WARNING", logger="wantrainer"), RunLock(tmp_path, "lora") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"process {pid}" in caplog.text and "no longer running" in caplog.text


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    lock_path(tmp_path, "lora").write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere", "started": "x"}))
    with pytest.raises(UserError, match="on host elsewhere"):
        RunLock(tmp_path, "lora").acquire()


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path):
    """Our own pid, but a different process start time: the process that held the lock is gone."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": "x", "start_tick": 1}
    lock_path(tmp_path, "lora").write_text(json.dumps(info))
    with RunLock(tmp_path, "lora"):
        pass


def test_stray_temporaries_of_this_output_name_are_removed_and_nothing_else(tmp_path):
    ours = [".lora.safetensors.k2j3h4g5.tmp", ".lora-step00000004.safetensors.ab_cd123.tmp",
            ".lora_high_noise-epoch000002.safetensors.x1y2z3w4.tmp"]
    our_dirs = [".lora-step00000004-state.tmp", ".lora-step00000002-state.old"]
    kept = [".lorax.safetensors.k2j3h4g5.tmp", ".other.safetensors.k2j3h4g5.tmp", ".lora.notes", "lora-notes.tmp",
            "lora.safetensors", ".lora.lock"]
    kept_dirs = [".other-step00000004-state.tmp", "lora-step00000002-state"]
    for name in ours + kept:
        (tmp_path / name).write_text("x")
    for name in our_dirs + kept_dirs:
        (tmp_path / name).mkdir()
        (tmp_path / name / "inside.pt").write_text("x")
    removed = remove_stray_temporaries(tmp_path, "lora")
    assert sorted(p.name for p in removed) == sorted(ours + our_dirs)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + kept_dirs)


def test_claiming_the_folder_cleans_temporaries_under_the_lock(tmp_path, saving):
    (tmp_path / ".lora-step00000004-state.tmp").mkdir()
    with claim_output_folder(saving(tmp_path)) as lock:
        assert lock.held and not (tmp_path / ".lora-step00000004-state.tmp").exists()


@pytest.fixture()
def saving():
    from wantrainer.config.output import SavingConfig

    return lambda folder, **kw: SavingConfig(output_dir=folder, output_name="lora", **kw)


def test_earlier_saves_are_the_loras_and_states_of_this_name(tmp_path):
    names = ["lora.safetensors", "lora-step00000100.safetensors", "lora-step00000100-state", "lora-000002.safetensors",
             "lora_low_noise-epoch000002.safetensors", "lora-step00000100-ema.safetensors"]
    for name in names:
        (tmp_path / name).write_text("x")
    for name in ["lora2.safetensors", "other.safetensors", "lora.toml", "lora-notes.txt"]:
        (tmp_path / name).write_text("x")
    assert sorted(p.name for p in earlier_saves(tmp_path, "lora")) == sorted(names)


# --- a second run on a folder with earlier saves: refused, then continued each of the three ways -----------


def _build(ws, folder, **values):
    values.setdefault("log_with", "none")
    return build_trainer(load(ws.write(folder, **values)))


def test_a_fresh_run_over_earlier_saves_is_refused_then_continued_three_ways(train_workspace, tmp_path):
    first = dict(max_train_steps=2, save_every_n_steps=1, save_state=True, auto_resume=False)
    assert _build(train_workspace, tmp_path, **first).train() == "completed"
    out = tmp_path / "out"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("lora")}

    with pytest.raises(UserError) as info:
        _build(train_workspace, tmp_path, **first)
    text = str(info.value)
    for fragment in ("already holds saves", 'output_name "lora"', "auto_resume = true", "another output_name",
                     "overwrite_output = true", "lora.safetensors"):
        assert fragment in text, text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("lora")} == before

    # 1. auto_resume: continues the earlier run from its newest state
    resumed = _build(train_workspace, tmp_path, **dict(first, auto_resume=True, max_train_steps=3))
    assert resumed.resume_from == out / "lora-step00000002-state"
    assert resumed.train() == "completed" and resumed.state.step == 3
    # 2. another output_name: a new run beside it, nothing of the first touched
    other = _build(train_workspace, tmp_path, **dict(first, output_name="second"))
    assert other.train() == "completed" and (out / "second.safetensors").is_file()
    assert (out / "lora-step00000001.safetensors").stat().st_mtime_ns == before["lora-step00000001.safetensors"]
    # 3. overwrite_output: the earlier saves of that name are deleted, the run starts at step 0
    fresh = _build(train_workspace, tmp_path, **dict(first, overwrite_output=True, max_train_steps=1,
                                                      save_every_n_steps=None))
    assert fresh.resume_from is None
    assert not (out / "lora-step00000002-state").exists() and not (out / "lora-step00000001.safetensors").exists()
    assert fresh.train() == "completed" and fresh.state.step == 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("lora") and p.suffix != ".png") == [
        "lora-step00000001-state", "lora.safetensors"]
    assert (out / "second.safetensors").is_file()


def test_auto_resume_is_the_default_and_saves_without_a_state_are_still_refused(train_workspace, tmp_path):
    assert _build(train_workspace, tmp_path, max_train_steps=1).train() == "completed"  # no save_state
    with pytest.raises(UserError, match="no state folder to resume from"):
        _build(train_workspace, tmp_path, max_train_steps=2)


# --- permissions follow the umask ------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_umask_permissions(tmp_path, mask, monkeypatch):
    atomic.file_mode.cache_clear()
    old = os.umask(mask)
    try:
        atomic.write_text_atomic(tmp_path / "a.txt", "x")
        mode = (tmp_path / "a.txt").stat().st_mode & 0o777
    finally:
        os.umask(old)
        atomic.file_mode.cache_clear()
    assert mode == 0o666 & ~mask


def test_every_file_of_a_run_is_readable_by_others_under_umask_022(train_workspace, tmp_path):
    atomic.file_mode.cache_clear()
    old = os.umask(0o022)
    try:
        _build(train_workspace, tmp_path, max_train_steps=2, save_every_n_steps=1, save_state=True).train()
    finally:
        os.umask(old)
        atomic.file_mode.cache_clear()
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert any(p.suffix == ".safetensors" for p in files) and any(p.suffix == ".pt" for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o644)}, files
