"""Convert a Wan DiT checkpoint's precision and key layout in bounded memory (one tensor at a time, no mmap).

    python tools/convert_dit.py IN.safetensors OUT.safetensors --precision bf16|fp16|fp32|fp8|fp8_scaled
        [--comfyui-prefix | --no-comfyui-prefix]

fp8 stores the block Linear weights as float8_e4m3fn; fp8_scaled is ComfyUI's scaled-fp8 format (a float32
``scale_weight`` per weight and the ``scaled_fp8`` marker); all other tensors become bf16. An fp8 input is
dequantised with its stored scales. ``--comfyui-prefix`` adds ``model.diffusion_model.`` to every key,
``--no-comfyui-prefix`` removes it (default: as the input). The output is written atomically and read by
``wantrainer``'s loader, ComfyUI and diffusers' single-file converter (for the non-fp8 precisions). The resident
memory is about twice the largest tensor (a 14B file converts in a few hundred MB).
"""

from __future__ import annotations

import argparse
import sys

from wantrainer.cli import run_reporting_errors
from wantrainer.models.wan.convert import PRECISIONS, convert_dit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="DiT checkpoint (one .safetensors file, original or ComfyUI layout)")
    parser.add_argument("dst", help="the .safetensors file to write")
    parser.add_argument("--precision", required=True, choices=list(PRECISIONS), help="precision of the output")
    prefix = parser.add_mutually_exclusive_group()
    prefix.add_argument("--comfyui-prefix", dest="prefix", action="store_true", default=None,
                        help="write keys with the model.diffusion_model. prefix")
    prefix.add_argument("--no-comfyui-prefix", dest="prefix", action="store_false",
                        help="write keys without a prefix (original Wan layout)")
    args = parser.parse_args(argv)
    return run_reporting_errors(
        lambda: f"wrote {args.dst}: {convert_dit(args.src, args.dst, args.precision, args.prefix)} tensors, "
                f"{args.precision}")


if __name__ == "__main__":
    sys.exit(main())
