"""``release_freed_memory``: freed blocks of 64 KiB or more go back to the system (glibc), measured on the pattern
that keeps them resident by default (mid-size temporaries freed between small tensors that stay)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from train_support import load, train_command, write_config
from wantrainer.core.wan_network_trainer import build_trainer

_PATTERN = """
import sys
import torch
from wantrainer.utils.memory import release_freed_blocks, rss_bytes
if sys.argv[1] == "1":
    assert release_freed_blocks()
big = torch.ones(4 * 2**20)  # 16 MiB, mapped on its own: freeing it raises glibc's default threshold to 16 MiB
del big
base = rss_bytes()
temps, keep = [], []
for _ in range(200):
    temps.append(torch.ones(2**18))  # 1 MiB, as a step's activations
    keep.append(torch.ones(64))  # small and long-lived, between them (as gradients, optimiser state)
del temps
print((rss_bytes() - base) / 2**20)
"""

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the setting is glibc's (Linux)")


@glibc
def test_freed_mid_size_tensors_leave_the_process():
    held = {flag: float(subprocess.run([sys.executable, "-c", _PATTERN, flag], capture_output=True, text=True,
                                       check=True).stdout) for flag in ("0", "1")}
    print(f"RSS held after freeing 200 x 1 MiB: {held['0']:.1f} MiB by default, {held['1']:.2f} MiB released")
    assert held["0"] > 150 and held["1"] < 10  # measured 200.0 / 0.07


@glibc
def test_training_with_the_setting_trains_the_same_lora(train_workspace, tmp_path):
    """The allocator setting changes where memory comes from, not a number: the same LoRA bit for bit (each run a
    `wantrainer train` process: the setting lasts for the process)."""
    outs = {}
    for flag in (False, True):
        stderr, outs[flag] = train_command(train_workspace, tmp_path, str(flag), max_train_steps=2,
                                           release_freed_memory=flag)
        assert "has no effect" not in stderr
    assert all(outs[False][k].equal(outs[True][k]) for k in outs[False])


def test_the_setting_warns_where_it_cannot_apply(train_workspace, tmp_path, monkeypatch, caplog):
    import wantrainer.utils.memory as memory

    monkeypatch.setattr(memory.platform, "system", lambda: "Windows")  # mallopt is not called
    values = train_workspace.config(tmp_path / "o", log_with="none", max_train_steps=1, release_freed_memory=True)
    with caplog.at_level("WARNING"):
        build_trainer(load(write_config(tmp_path / "c.toml", values)))
    assert "release_freed_memory = true has no effect here" in caplog.text
