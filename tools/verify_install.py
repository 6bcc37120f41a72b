"""Check the installation: versions, GPU and its memory, attention kernels, optional packages, free disk space.

    python tools/verify_install.py [--cache-dir DIR] [--min-free-gb 50] [--require-gpu] [--min-gpu-gb 24]

Prints one line per check (ok / missing / problem) and what to do about each problem. Exit code 0 when everything
required is in place (the core packages import, enough free disk in --cache-dir, and with --require-gpu a CUDA
GPU with at least --min-gpu-gb of memory); 2 otherwise. Optional packages (bitsandbytes, prodigyopt, wandb,
flash-attn, sageattention, xformers) are reported but never fail the check.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
from pathlib import Path

REQUIRED = ("torch", "accelerate", "diffusers", "transformers", "safetensors", "av", "PIL", "pydantic", "tensorboard")
OPTIONAL = {  # import name -> (what it gives, how to install)
    "flash_attn": ("attn_mode = \"flash_attn\"", "pip install flash-attn --no-build-isolation"),
    "sageattention": ("attn_mode = \"sage_attn\" (sampling only)", "pip install sageattention"),
    "xformers": ("attn_mode = \"xformers\"", "pip install xformers (built for your torch)"),
    "bitsandbytes": ("optimizer_type = \"adamw8bit\"", "pip install bitsandbytes"),
    "prodigyopt": ("optimizer_type = \"prodigy\"", "pip install prodigyopt"),
    "wandb": ("log_with = \"wandb\"", "pip install wandb"),
}


def _version(name: str) -> str | None:
    try:
        module = importlib.import_module(name)
    except Exception:  # an optional package can fail at import in many ways (missing CUDA libs, ABI mismatch)
        return None
    return str(getattr(module, "__version__", "installed"))


def check(cache_dir: Path, min_free_gb: float, require_gpu: bool, min_gpu_gb: float) -> tuple[list[str], list[str]]:
    """(report lines, problems)."""
    lines, problems = [], []
    for name in REQUIRED:
        version = _version(name)
        lines.append(f"{'ok' if version else 'MISSING':8s} {name} {version or ''}".rstrip())
        if version is None:
            problems.append(f"{name} does not import: reinstall with `pip install -e .` in this environment")
    import torch

    lines.append(f"{'ok':8s} python {sys.version.split()[0]}, torch {torch.__version__}, CUDA build "
                 f"{torch.version.cuda or 'none (CPU-only torch)'}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gb = props.total_memory / 2**30
            lines.append(f"{'ok':8s} GPU {index}: {props.name}, {gb:.1f} GiB, compute capability "
                         f"{props.major}.{props.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
            if require_gpu and gb < min_gpu_gb:
                problems.append(f"GPU {index} has {gb:.1f} GiB, below --min-gpu-gb {min_gpu_gb:g}: use fp8_base, "
                                "blocks_to_swap and gradient_checkpointing, or a larger GPU")
    else:
        lines.append(f"{'none':8s} CUDA GPU (torch.cuda.is_available() is False)")
        if require_gpu:
            problems.append("no CUDA GPU is visible: install a CUDA build of torch "
                            "(https://pytorch.org/get-started/locally/) and check the driver with nvidia-smi")
    for name, (gives, how) in OPTIONAL.items():
        version = _version(name)
        lines.append(f"{'ok' if version else 'absent':8s} {name} {version or ''} - {gives}"
                     + ("" if version else f"; to enable: {how}"))
    target = cache_dir if cache_dir.exists() else next((p for p in cache_dir.parents if p.exists()), Path("/"))
    free_gb = shutil.disk_usage(target).free / 2**30
    lines.append(f"{'ok' if free_gb >= min_free_gb else 'LOW':8s} disk: {free_gb:.1f} GiB free in {target}")
    if free_gb < min_free_gb:
        problems.append(f"only {free_gb:.1f} GiB free in {target} (--min-free-gb {min_free_gb:g}): latent caches of "
                        "video datasets need tens of GB; free space or point --cache-dir at a larger disk")
    return lines, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path.cwd(), help="where caches will go (default: here)")
    parser.add_argument("--min-free-gb", type=float, default=20.0, help="free disk space required (default 20)")
    parser.add_argument("--require-gpu", action="store_true", help="fail without a CUDA GPU")
    parser.add_argument("--min-gpu-gb", type=float, default=0.0, help="with --require-gpu: GPU memory required")
    args = parser.parse_args(argv)
    lines, problems = check(args.cache_dir, args.min_free_gb, args.require_gpu, args.min_gpu_gb)
    print("\n".join(lines))
    if problems:
        print(f"\n{len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 2
    print("\ninstallation OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
