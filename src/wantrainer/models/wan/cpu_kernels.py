"""The CPU fp8 upcast kernel (``e4m3_cpu.c``): built at first use with the machine's C compiler, loaded with ctypes.

PyTorch has no fast CPU conversion from float8_e4m3fn: its own is about 6x slower than the integer operations of
``stored_linear._upcast_e4m3_cpu``, and those still make five passes over each piece of a weight. The C kernel
does the same bit arithmetic in one pass with the CPU's vector half -> float instruction (AVX-512 or AVX2 +
F16C): at the 1.3B size it upcasts ffn.0 ([8960, 1536]) 2.5-4x faster than the torch operations
(docs/benchmarks.md, stored_linear). The result is the same to the bit.

It is compiled once per machine type into ``$XDG_CACHE_HOME/wantrainer/kernels`` (``~/.cache`` by default; the
name holds a hash of the source, the compiler, the OpenMP runtime and the CPU's model and flags), written under a
temporary name and renamed, so processes of one run can build it at the same time. Its OpenMP calls are linked
to the runtime torch has loaded, so the kernel's threads are torch's own: a second pool would compete with
torch's threads, which keep spinning for a while after each operation (measured: two threads of their own made
the kernel no faster than one). Without a C compiler (``$CC``, ``cc``, ``gcc``
or ``clang``), on a CPU without those instructions, or with ``WANTRAINER_CPU_KERNELS=0`` the torch operations
are used, with the reason logged once at debug level. Only the CPU is concerned: on a GPU the upcast is one
torch kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from ...common.logger import get_logger

logger = get_logger(__name__)

SOURCE = Path(__file__).with_name("e4m3_cpu.c")
FLAGS = ["-O3", "-march=native", "-fPIC"]
_OPENMP_NAMES = ("libgomp", "libiomp", "libomp")  # GNU, Intel and LLVM runtimes (all take GCC's OpenMP calls)
_MIN_ELEMENTS_PER_THREAD = 65536  # below this a weight is upcast on one thread

_kernel: ctypes.CDLL | None = None
_reason: str | None = None  # why there is no kernel, once it was looked for


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpuinfo_lines() -> list[str]:
    """The lines of /proc/cpuinfo; none where it is unread (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _cpu_signature() -> str:
    """The CPU's model name and flags (what -march=native builds for); the machine name where they are unread."""
    lines = _cpuinfo_lines()
    if not lines:
        return platform.machine() + platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return platform.machine() + "\n".join(dict.fromkeys(wanted))  # the first of each distinct line


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (``avx512f``, ``amx_bf16``, ...); empty where unread."""
    lines = _cpuinfo_lines()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


def openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (torch's, once torch is imported; Linux only)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = (line.split()[-1] for line in maps if len(line.split()) >= 6)
    return list(dict.fromkeys(p for p in paths if Path(p).name.startswith(_OPENMP_NAMES)))


def torch_openmp_runtime(runtimes: list[str] | None = None) -> str | None:
    """The OpenMP runtime torch uses: the mapped one in torch's folder (other packages, e.g. sentencepiece, bring
    their own copies), else the only or first mapped one."""
    runtimes = openmp_runtimes() if runtimes is None else runtimes
    torch_dir = str(Path(torch.__file__).resolve().parent)
    own = [p for p in runtimes if str(Path(p).resolve()).startswith(torch_dir)]
    return (own or runtimes or [None])[0]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wantrainer" / "kernels"


def _build(compiler: str, runtime: str | None) -> Path:
    """The kernel's shared library, compiled (with OpenMP linked to ``runtime`` when given) unless cached."""
    key = hashlib.sha256("\n".join(
        [SOURCE.read_text(), compiler, " ".join(FLAGS), str(runtime), _cpu_signature()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"e4m3_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    obj = partial.with_suffix(".o")
    openmp = ["-fopenmp"] if runtime else []
    try:
        for command in ([compiler, *FLAGS, *openmp, "-c", str(SOURCE), "-o", str(obj)],
                        [compiler, "-shared", str(obj), *([runtime] if runtime else []), "-o", str(partial)]):
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
        obj.unlink(missing_ok=True)
    return target


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("WANTRAINER_CPU_KERNELS", "1") == "0":
        return None, "WANTRAINER_CPU_KERNELS=0"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler (set CC, or install cc / gcc / clang)"
    runtimes = openmp_runtimes()
    runtime = torch_openmp_runtime(runtimes)
    try:
        library = ctypes.CDLL(str(_build(compiler, runtime)))
    except subprocess.CalledProcessError as error:
        return None, f"{compiler} failed: {error.stderr.strip()[-300:]}"
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"it could not be built or loaded ({error})"
    if len(openmp_runtimes()) > max(1, len(runtimes)):
        return None, f"it would run another OpenMP runtime beside {runtime}"
    library.wt_e4m3_width.restype = ctypes.c_int
    if library.wt_e4m3_width() == 0:
        return None, "this CPU has no AVX2 + F16C (or AVX-512)"
    library.wt_e4m3_rows.restype = ctypes.c_int
    library.wt_e4m3_rows.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_int]  # fmt: skip
    return library, None


def e4m3_kernel() -> ctypes.CDLL | None:
    """The loaded kernel, or None (``unavailable_reason`` says why); looked for once per process."""
    global _kernel, _reason
    if _kernel is None and _reason is None:
        _kernel, _reason = _load()
        if _kernel is None:
            logger.debug("CPU fp8 upcast: torch operations (the C kernel is not used: %s)", _reason)
    return _kernel


def unavailable_reason() -> str | None:
    e4m3_kernel()
    return _reason


def reset() -> None:
    """Forget the loaded kernel (tests, or after changing ``WANTRAINER_CPU_KERNELS``)."""
    global _kernel, _reason
    _kernel, _reason = None, None


def threaded() -> bool:
    """Whether the kernel shares its rows over torch's OpenMP threads (else it runs on the calling thread)."""
    kernel = e4m3_kernel()
    return kernel is not None and bool(kernel.wt_e4m3_threaded())


def upcast_e4m3_rows(weight: torch.Tensor, factor: torch.Tensor, out: torch.Tensor) -> bool:
    """``out`` = e4m3 ``weight`` / 256 * ``factor[:, None]`` with the C kernel; False (nothing written) where it
    cannot: no kernel, or tensors that are not contiguous fp32 CPU ones of the weight's shape."""
    kernel = e4m3_kernel()
    if kernel is None or out.dtype != torch.float32 or factor.dtype != torch.float32 or out.device.type != "cpu":
        return False
    if not (weight.is_contiguous() and out.is_contiguous() and factor.is_contiguous()):
        return False
    rows, cols = weight.shape
    if out.shape != weight.shape or factor.numel() != rows:
        return False
    threads = max(1, min(torch.get_num_threads(), rows * cols // _MIN_ELEMENTS_PER_THREAD))
    kernel.wt_e4m3_rows(weight.data_ptr(), factor.data_ptr(), out.data_ptr(), rows, cols, threads)
    return True


__all__ = ["cache_dir", "cpu_flags", "e4m3_kernel", "openmp_runtimes", "reset", "threaded", "torch_openmp_runtime",
           "unavailable_reason",
           "upcast_e4m3_rows"]
