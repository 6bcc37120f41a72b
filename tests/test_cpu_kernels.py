"""The CPU fp8 upcast kernel (models/wan/cpu_kernels.py, e4m3_cpu.c) against the torch-operations path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wantrainer.models.wan import cpu_kernels
from wantrainer.models.wan.fp8 import quantize_weight
from wantrainer.models.wan.stored_linear import FP8_DTYPE, upcast_weight_into


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A kernel looked for again, built into an empty cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("WANTRAINER_CPU_KERNELS", raising=False)
    cpu_kernels.reset()
    yield tmp_path
    cpu_kernels.reset()


def torch_ops(weight, scale, monkeypatch):
    """The upcast by torch operations only (the kernel switched off)."""
    monkeypatch.setenv("WANTRAINER_CPU_KERNELS", "0")
    cpu_kernels.reset()
    try:
        return upcast_weight_into(weight, scale, torch.empty(weight.shape))
    finally:
        monkeypatch.delenv("WANTRAINER_CPU_KERNELS")
        cpu_kernels.reset()


def needs_kernel():
    if cpu_kernels.e4m3_kernel() is None:
        pytest.skip(f"the CPU fp8 kernel is not built here: {cpu_kernels.unavailable_reason()}")


def test_kernel_is_built_once_into_the_cache(fresh):
    needs_kernel()
    built = list((fresh / "wantrainer" / "kernels").glob("e4m3_cpu-*.so"))
    assert len(built) == 1 and not list(built[0].parent.glob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns
    cpu_kernels.reset()
    assert cpu_kernels.e4m3_kernel() is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_kernel_threads_are_torchs_own(fresh):
    """Built with OpenMP where torch has an OpenMP runtime, linked to torch's copy (other packages may map their
    own): loading the kernel maps no runtime that was not mapped before."""
    before = cpu_kernels.openmp_runtimes()
    needs_kernel()
    assert cpu_kernels.openmp_runtimes() == before
    assert cpu_kernels.threaded() == bool(before)
    torch_dir = str(Path(torch.__file__).resolve().parent)
    if any(str(Path(p).resolve()).startswith(torch_dir) for p in before):
        assert str(Path(cpu_kernels.torch_openmp_runtime()).resolve()).startswith(torch_dir)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cols", [16, 24, 7, 1536])
def test_kernel_equals_torch_operations_for_every_byte(fresh, monkeypatch, threads, cols):
    """Every e4m3 code, with and without per-row scales, rows split over threads, and a row length that is
    not a whole number of vectors: the same bits as the torch-operations path, and torch's own conversion's
    values (the two NaN codes aside: a weight never holds them)."""
    needs_kernel()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = 2 * 65536 * threads // cols + 3 if cols == 1536 else 40
        codes = torch.arange(rows * cols, dtype=torch.int64).remainder(256).to(torch.uint8)
        weight = codes.view(FP8_DTYPE).reshape(rows, cols)
        scale = torch.rand(rows, generator=torch.Generator().manual_seed(cols)) + 0.01
        for row_scale in (scale, None):
            out = upcast_weight_into(weight, row_scale, torch.empty(rows, cols))
            assert torch.equal(out, torch_ops(weight, row_scale, monkeypatch))
            expected = weight.float() * (row_scale[:, None] if row_scale is not None else 1.0)
            finite = ~torch.isnan(expected)
            assert torch.equal(out[finite], expected[finite])
    finally:
        torch.set_num_threads(before)


def test_kernel_upcasts_a_real_size_weight_exactly(fresh):
    needs_kernel()
    gen = torch.Generator().manual_seed(0)
    weight, scale = quantize_weight(torch.randn(896, 1536, generator=gen) * 0.02, scaled=True)
    out = torch.empty(896, 1536)
    assert cpu_kernels.upcast_e4m3_rows(weight, scale * 256.0, out)
    assert torch.equal(out, weight.float() * scale[:, None])


def test_tensors_the_kernel_does_not_take_are_left_to_torch(fresh):
    needs_kernel()
    weight = torch.zeros(4, 32).to(FP8_DTYPE)
    assert not cpu_kernels.upcast_e4m3_rows(weight, torch.ones(4), torch.empty(4, 32, dtype=torch.bfloat16))
    assert not cpu_kernels.upcast_e4m3_rows(weight, torch.ones(4), torch.empty(32, 4).t())  # not contiguous
    assert not cpu_kernels.upcast_e4m3_rows(weight, torch.ones(3), torch.empty(4, 32))
    ones = torch.ones(4, 32).to(FP8_DTYPE)
    bf16 = upcast_weight_into(ones, None, torch.empty(4, 32, dtype=torch.bfloat16))  # torch operations
    assert torch.equal(bf16, torch.ones(4, 32, dtype=torch.bfloat16))


def test_without_a_compiler_or_when_switched_off_torch_operations_are_used(fresh, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PATH", str(fresh))  # no cc / gcc / clang on it
    assert cpu_kernels.e4m3_kernel() is None
    assert "no C compiler" in cpu_kernels.unavailable_reason()
    weight = torch.tensor([[0.5, -1.25, 448.0]]).to(FP8_DTYPE)
    assert torch.equal(upcast_weight_into(weight, None, torch.empty(1, 3)), torch.tensor([[0.5, -1.25, 448.0]]))
    monkeypatch.undo()
    monkeypatch.setenv("WANTRAINER_CPU_KERNELS", "0")
    cpu_kernels.reset()
    assert cpu_kernels.e4m3_kernel() is None and cpu_kernels.unavailable_reason() == "WANTRAINER_CPU_KERNELS=0"
    cpu_kernels.reset()


def test_a_compiler_error_is_a_reason_not_a_failure(fresh, monkeypatch, tmp_path):
    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler here")
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    assert cpu_kernels.e4m3_kernel() is None
    assert "failed" in cpu_kernels.unavailable_reason()
    assert not list((fresh / "wantrainer" / "kernels").glob("*"))  # no partial file left


@pytest.mark.parametrize(("flags", "level", "text"), [
    (set(), "WARNING", "very slow without AMX (this CPU has no amx_bf16"),
    ({"avx512f", "amx_bf16"}, "INFO", "it has amx_bf16, so its bf16 matmuls use AMX"),
])  # fmt: skip
def test_cpu_autocast_message_follows_the_cpus_amx(monkeypatch, caplog, flags, level, text):
    from wantrainer.core import wan_network_trainer

    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: flags)
    with caplog.at_level("INFO", logger="wantrainer"):
        wan_network_trainer.warn_cpu_autocast("bf16")
    (record,) = [r for r in caplog.records if "mixed_precision" in r.getMessage()]
    assert record.levelname == level and text in record.getMessage()


def test_cpu_flags_are_read_from_the_system():
    flags = cpu_kernels.cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    assert all(flag == flag.lower() and " " not in flag for flag in flags)
