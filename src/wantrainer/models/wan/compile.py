"""``compile_blocks``: ``torch.compile`` (inductor) of each DiT block, checked before anything is loaded.

Each block is compiled in place (``nn.Module.compile``), so parameter names, ``state_dict()`` keys, LoRA wrapping,
gradient checkpointing (the checkpoint wraps the compiled block and recomputes through it) and block swap (the
swapper moves the block's tensors between blocks; the compiled code only runs once they are on the device) stay
as they are. The blocks share one code object and one set of graphs: a LoRA wraps every Linear with the same
bound function (``networks.adapters``), so nothing differs between blocks but their tensors. The first block's
input needs no gradient and the others' do (two graphs); TREAD routing and new batch shapes add graphs for the
new shapes (dynamic shapes after the first change).

``require_compiler(device)`` finds what inductor needs for ``device`` (a C++ compiler on the CPU, Triton on CUDA)
and then compiles a tiny function there, so a platform that cannot compile is a ``UserError`` when the run
starts instead of an exception inside the first training step.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from wantrainer.common.logger import get_logger
from wantrainer.errors import UserError

logger = get_logger(__name__)

_HOW = "or set `compile_blocks = false` (eager mode trains the same LoRA, only slower on some GPUs)"
_probed: set[str] = set()


def missing_compiler(device: torch.device | str) -> str | None:
    """What inductor lacks to compile for ``device`` (without compiling anything), or None."""
    device = torch.device(device)
    if not torch._dynamo.is_dynamo_supported():
        import sys

        return f"torch.compile does not support this Python ({sys.version.split()[0]}) with torch {torch.__version__}"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return ("torch.compile on CUDA needs Triton, which is not installed (pip install triton; on Windows "
                    "pip install triton-windows)")
        return None
    if device.type != "cpu":
        return f"compile_blocks supports CPU and CUDA devices, not {device.type}"
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as exc:  # inductor's own search: $CXX, else g++ (clang++ on macOS), cl on Windows
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (f"torch.compile on the CPU needs a C++ compiler and none was found ({first}); install one (e.g. "
                "apt-get install g++, or the Visual Studio C++ build tools on Windows) or point $CXX at it")
    return None


def require_compiler(device: torch.device | str, probe: bool = True) -> None:
    """Raise a ``UserError`` naming ``compile_blocks`` when blocks cannot be compiled for ``device``; with
    ``probe`` also compile (once per process and device) a tiny function there."""
    device = torch.device(device)
    problem = missing_compiler(device)
    if problem is None and probe and str(device) not in _probed:
        try:
            fn = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2.0 + 1.0, dynamic=False)
            fn(torch.ones(8, device=device))
            _probed.add(str(device))
        except Exception as exc:  # the compiler is there but does not work (headers, permissions, ...)
            text = str(exc).strip().splitlines()
            problem = f"a test compilation failed: {type(exc).__name__}: {text[0] if text else ''}"
    if problem:
        raise UserError(f"`compile_blocks = true`: {problem}; {_HOW}")


def compile_blocks(blocks: nn.ModuleList) -> None:
    """Compile each block in place (inductor, default mode); the graphs are built at the first calls."""
    for block in blocks:
        block.compile()
    logger.info("compile_blocks: %d blocks compiled with torch.compile (inductor); the first steps compile "
                "(slow), later ones reuse the code", len(blocks))
