"""Signals and exit codes a job scheduler can use: 0 done, 130 SIGINT / 143 SIGTERM after saving, 2 user error;
two train commands on one folder; a signal while starting; a second Ctrl-C during a save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from train_support import write_config
from wantrainer.core.run_folder import lock_path
from wantrainer.core.signals import Interrupted, StopRequest


def _train(config, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "wantrainer.cli", "train", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)


def _wait_for(proc, fragment, timeout=180):
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stderr:
        seen.append(line)
        if fragment in line:
            return "".join(seen)
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"{fragment!r} not seen:\n" + "".join(seen))


@pytest.mark.slow
def test_two_trains_on_one_folder_then_sigterm_exits_143_after_saving(train_workspace, tmp_path):
    values = train_workspace.config(tmp_path / "out", max_train_steps=1_000_000, save_every_n_steps=2,
                                    save_state=True, log_with="none")
    config = write_config(tmp_path / "my.toml", values)
    first = _train(config, tmp_path)
    try:
        _wait_for(first, "lora-step00000002.safetensors")
        second = subprocess.run([sys.executable, "-m", "wantrainer.cli", "train", "--config", str(config)],
                                capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert second.returncode == 2, second.stderr
        assert f"process {first.pid}" in second.stderr and str(tmp_path / "out") in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        rest = first.stderr.read()
        assert first.wait(timeout=120) == 143, rest
    finally:
        if first.poll() is None:
            first.kill()
    assert "Traceback" not in rest and "exit code 143" in rest
    states = sorted((tmp_path / "out").glob("lora-step*-state"))
    assert states and (states[-1] / "COMPLETE.json").is_file()
    assert not lock_path(tmp_path / "out", "lora").exists()
    assert not list((tmp_path / "out").glob(".*.tmp"))


@pytest.mark.slow
def test_ctrl_c_while_starting_exits_130_and_writes_nothing(train_workspace, tmp_path):
    config = write_config(tmp_path / "my.toml", train_workspace.config(tmp_path / "out", max_train_steps=50))
    proc = _train(config, tmp_path)
    try:
        _wait_for(proc, "network default:")  # logged while building, before the first step
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=120) == 130, rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in rest and "nothing was trained or saved" in rest
    out = tmp_path / "out"
    assert not list(out.glob("lora*")) and not lock_path(out, "lora").exists()
    assert not (out / "logs").exists()


def test_a_completed_train_exits_0_and_a_user_error_2(train_workspace, tmp_path):
    from wantrainer.cli import main

    config = write_config(tmp_path / "my.toml", train_workspace.config(tmp_path / "out", max_train_steps=1,
                                                                       log_with="none"))
    assert main(["train", "--config", str(config)]) == 0
    bad = write_config(tmp_path / "bad.toml", train_workspace.config(tmp_path / "out2", optimizer_type="nope"))
    assert main(["train", "--config", str(bad)]) == 2


# --- the phases of a stop request (the signal handler itself, called as a signal would call it) -------------


def test_a_signal_while_starting_stops_at_once_with_its_exit_code():
    stop = StopRequest()
    stop.phase = "starting"
    with pytest.raises(Interrupted) as info:
        stop._handler(signal.SIGTERM, None)
    assert info.value.exit_code == 143 and stop.exit_code == 143


def test_no_signal_interrupts_a_save_and_a_second_ctrl_c_stops_right_after_it():
    stop = StopRequest()
    stop._handler(signal.SIGINT, None)  # first: finish the step, save, return
    assert stop.requested and stop.exit_code == 130
    written = []
    with pytest.raises(Interrupted) as info, stop.deferred():
        stop._handler(signal.SIGINT, None)  # second, during the save: does not raise here
        written.append("the whole save")
    assert written == ["the whole save"] and info.value.exit_code == 130


def test_a_second_ctrl_c_outside_a_save_stops_now_and_signals_after_the_end_are_ignored():
    stop = StopRequest()
    stop._handler(signal.SIGINT, None)
    with pytest.raises(Interrupted):
        stop._handler(signal.SIGINT, None)
    stop.finish()
    stop._handler(signal.SIGINT, None)  # after the final save: ignored, nothing raised


def test_a_signal_wrapped_by_a_library_still_exits_with_its_code(monkeypatch, capsys):
    """pydantic (and others) re-raise an exception raised inside their callbacks as their own error."""
    import wantrainer.cli as cli

    def handler(args):
        try:
            raise Interrupted("SIGTERM", "SIGTERM before training started: nothing was trained or saved")
        except Interrupted as exc:
            raise RuntimeError("Error calling function `ser_path`") from exc

    real = cli._load_handler
    monkeypatch.setattr(cli, "_load_handler", lambda spec: handler if spec.endswith(":run") else real(spec))
    assert cli.main(["doctor", "--config", "my.toml"]) == 143
    assert "nothing was trained or saved" in capsys.readouterr().err

    def crash(args):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(cli, "_load_handler", lambda spec: crash if spec.endswith(":run") else real(spec))
    with pytest.raises(RuntimeError, match="a real bug"):
        cli.main(["doctor", "--config", "my.toml"])
