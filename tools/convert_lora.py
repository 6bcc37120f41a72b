"""Convert a Wan LoRA between layouts: kohya/musubi, diffusion_model (ComfyUI style) and diffusers.

    python tools/convert_lora.py IN.safetensors OUT.safetensors --to diffusers [--dtype bf16]

kohya keeps rank and alpha; for a LoRA the other two layouts have no alpha, so alpha / rank is folded into the
down (lora_A) weights and a reader applies scale 1. LoHa, LoKr and DoRA files keep their tensor names and alpha in
the diffusion_model layout (ComfyUI reads both); diffusers' Wan loader reads plain LoRA only, so they have no
diffusers layout. The metadata is copied.
"""

from __future__ import annotations

import argparse
import sys

from wantrainer.cli import run_reporting_errors
from wantrainer.networks.formats import (
    FP32_SUFFIXES,
    LAYOUTS,
    SAVE_DTYPES,
    from_kohya,
    load_lora,
    module_tensors,
    save_lora,
)
from wantrainer.utils.atomic import save_safetensors_atomic


def convert(src: str, dst: str, layout: str, dtype: str | None = None) -> int:
    """Write ``src`` as ``layout`` to ``dst``; returns the number of LoRA modules."""
    sd, meta = load_lora(src)
    n_modules = len(module_tensors(sd))
    if layout == "kohya":
        first = next(v for k, v in sd.items() if not k.endswith(FP32_SUFFIXES))
        save_lora(dst, sd, meta, dtype=dtype or first.dtype)
        return n_modules
    out = from_kohya(sd, layout)
    if dtype is not None:
        out = {k: v if k.endswith(FP32_SUFFIXES) else v.to(SAVE_DTYPES[dtype]) for k, v in out.items()}
    save_safetensors_atomic(out, dst, metadata=meta)
    return n_modules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="input LoRA (any supported layout)")
    parser.add_argument("dst", help="output .safetensors")
    parser.add_argument("--to", required=True, choices=LAYOUTS, help="output layout")
    parser.add_argument("--dtype", choices=sorted(SAVE_DTYPES), help="cast the weights (default: keep)")
    args = parser.parse_args(argv)
    return run_reporting_errors(
        lambda: f"wrote {args.dst}: {convert(args.src, args.dst, args.to, args.dtype)} modules, layout {args.to}")


if __name__ == "__main__":
    sys.exit(main())
