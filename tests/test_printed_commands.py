"""Commands that wantrainer prints for the user (the demo's last lines, train's TensorBoard line) run as printed
in a fresh shell where the environment is not activated."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from wantrainer.common.commands import activation_hint, console_command


def _fresh_shell_env() -> dict[str, str]:
    """No activated environment: the venv's bin folder is not on PATH (PYTHONPATH keeps this checkout's code)."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != bin_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    return {**env, "PATH": path or "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def test_console_command_is_a_full_path_when_the_shell_would_not_find_it(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert console_command("wantrainer") == str(Path(sys.executable).parent / "wantrainer")
    assert "source " in (activation_hint() or "")
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    assert console_command("wantrainer") == "wantrainer" and activation_hint() is None


@pytest.mark.slow
def test_demo_commands_run_as_printed_without_an_activated_environment(tmp_path):
    from wantrainer.caching.cache_latents import cache_latents
    from wantrainer.caching.cache_text_encoder_outputs import cache_text
    from wantrainer.config_parser import load_config
    from wantrainer.devkit.demo import next_commands, prepare

    config = prepare(tmp_path / "demo", steps=2)
    cfg = load_config(config)
    cache_latents(cfg)
    cache_text(cfg)
    log_dir = tmp_path / "demo" / "output" / "logs"
    env = _fresh_shell_env()
    lines = next_commands(config, log_dir)
    commands = [line.split(":  ", 1)[1].strip() for line in lines if ":  " in line]
    assert len(commands) == 2 and commands[0].endswith(f"--logdir {log_dir}")
    # train, as printed (two steps into another folder, so the check is short)
    train = subprocess.run(["bash", "-c", f"{commands[1]} --max_train_steps 2 --output_dir {tmp_path / 'again'}"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    assert (tmp_path / "again" / "demo_lora.safetensors").is_file()
    # its TensorBoard hint names a command that exists in that shell too
    printed = next(line for line in train.stderr.splitlines() if "--logdir" in line)
    tensorboard = printed.split("(", 1)[1].split(" --logdir")[0]
    inspect = subprocess.run(["bash", "-c", f"{tensorboard} --inspect --logdir {tmp_path / 'again' / 'logs'}"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert inspect.returncode == 0 and "command not found" not in inspect.stderr, inspect.stderr[-2000:]
    shown = subprocess.run(["bash", "-c", f"{commands[0]} --inspect"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0 and "command not found" not in shown.stderr, shown.stderr[-2000:]
