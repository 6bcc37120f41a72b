"""``memory_allocator``: `wantrainer train` restarts itself with jemalloc / tcmalloc preloaded; what it changes
(the memory a step pattern holds) is measured, what it must not change (the LoRA) is compared bit for bit."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from train_support import load, train_command, write_config
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.preflight import command_problems
from wantrainer.utils import allocator

_STEPS = """
import torch
from wantrainer.utils.allocator import loaded_allocator
from wantrainer.utils.memory import peak_rss_bytes, rss_bytes
big = torch.ones(4 * 2**20)  # 16 MiB, mapped on its own: freeing it raises glibc's threshold past the step tensors
del big
base = rss_bytes()
keep = []
for step in range(20):  # 20 steps of 60 temporaries of 1-1.5 MiB, small long-lived tensors made between them
    temps = []
    for i in range(60):
        temps.append(torch.ones(2**18 + (i * 4099 + step * 7919) % 2**17))
        keep.append(torch.ones(64))
    del temps
print(loaded_allocator() or "system", (peak_rss_bytes() - base) / 2**20, (rss_bytes() - base) / 2**20)
"""

linux = pytest.mark.skipif(platform.system() != "Linux", reason="preloading a library needs Linux")


def _installed(name: str):
    return pytest.mark.skipif(allocator.find_library(name) is None,
                              reason=f"{name} is not installed here ({allocator._PACKAGES[name]})")


def _step_pattern(name: str) -> tuple[str, float, float]:
    env = allocator.preload_environment(name) if name != "system" else None
    out = subprocess.run([sys.executable, "-c", _STEPS], capture_output=True, text=True, check=True, env=env).stdout
    loaded, peak, held = out.split()
    return loaded, float(peak), float(held)


@linux
@pytest.mark.parametrize("name", [pytest.param("jemalloc", marks=_installed("jemalloc")),
                                  pytest.param("tcmalloc", marks=_installed("tcmalloc"))])
def test_a_preloaded_allocator_holds_less_over_steps(name):
    system, peak0, held0 = _step_pattern("system")
    loaded, peak, held = _step_pattern(name)
    print(f"20 steps of 60 x 1-1.5 MiB: glibc peak {peak0:.1f} MiB (held after {held0:.1f}); "
          f"{name} peak {peak:.1f} MiB (held after {held:.1f})")
    assert system == "system" and loaded == name
    assert peak < 0.85 * peak0  # measured: glibc 111 MiB, jemalloc 79.5 (held after: 5.6), tcmalloc 65.4


def test_a_library_is_found_by_its_name(tmp_path):
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    (tmp_path / "libtcmalloc.so.4").write_bytes(b"")
    assert allocator.find_library("jemalloc", [tmp_path]) == tmp_path / "libjemalloc.so.2"
    assert allocator.find_library("tcmalloc", [tmp_path]) == tmp_path / "libtcmalloc.so.4"  # gperftools' full one
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert allocator.find_library("tcmalloc", [tmp_path]) == tmp_path / "libtcmalloc_minimal.so.4"
    assert allocator.find_library("jemalloc", [tmp_path / "none"]) is None


def test_the_preload_environment_puts_the_library_first(tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "find_library", lambda name, dirs=None: tmp_path / "libjemalloc.so.2")
    env = allocator.preload_environment("jemalloc", {"LD_PRELOAD": "/x/libother.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"{tmp_path / 'libjemalloc.so.2'}:/x/libother.so"
    assert env[allocator.ALLOCATOR_MARK] == "jemalloc" and env["PATH"] == "/bin"


def test_the_loaded_allocator_is_read_from_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert allocator.loaded_allocator(maps) == "jemalloc"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.loaded_allocator(maps) is None


@linux
def test_validate_names_a_missing_library_and_the_glibc_setting_beside_it(train_workspace, tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "find_library", lambda name, dirs=None: None)
    monkeypatch.setattr(allocator, "loaded_allocator", lambda maps=None: None)
    values = train_workspace.config(tmp_path / "o", log_with="none", memory_allocator="jemalloc",
                                    release_freed_memory=True)
    problems = command_problems(load(write_config(tmp_path / "c.toml", values)), "train")
    missing = [p for p in problems if p.startswith('memory_allocator = "jemalloc": no libjemalloc.so')]
    assert missing and "apt install libjemalloc2" in missing[0]
    assert any(p.startswith("release_freed_memory = true tunes glibc's allocator") for p in problems)


def test_a_trainer_built_outside_the_command_warns_that_it_runs_with_the_system_allocator(
        train_workspace, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(allocator, "find_library", lambda name, dirs=None: tmp_path / "libjemalloc.so.2")
    monkeypatch.setattr(allocator, "loaded_allocator", lambda maps=None: None)
    monkeypatch.delenv(allocator.ALLOCATOR_MARK, raising=False)
    values = train_workspace.config(tmp_path / "o", log_with="none", max_train_steps=1, memory_allocator="jemalloc")
    with caplog.at_level("WARNING"):
        build_trainer(load(write_config(tmp_path / "c.toml", values)))
    assert 'memory_allocator = "jemalloc" is applied by the `wantrainer train` command' in caplog.text


@linux
@_installed("jemalloc")
def test_train_restarts_with_jemalloc_and_trains_the_same_lora(train_workspace, tmp_path):
    outs = {}
    for name in ("system", "jemalloc"):
        stderr, outs[name] = train_command(train_workspace, tmp_path, name, max_train_steps=2, memory_allocator=name)
        assert ("memory allocator: jemalloc (preloaded)" in stderr) == (name == "jemalloc"), stderr[-2000:]
    assert all(outs["system"][k].equal(outs["jemalloc"][k]) for k in outs["system"])
