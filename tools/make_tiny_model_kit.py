"""Write the tiny Wan model kit (DiTs, VAE, UMT5, tokenizer in the release layouts) into a folder.

    python tools/make_tiny_model_kit.py OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import sys

from wantrainer.devkit.tiny_kit import make_tiny_model_kit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the kit into (created if needed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every weight and of nothing else (default 0)")
    args = parser.parse_args(argv)
    kit = make_tiny_model_kit(args.out_dir, seed=args.seed)
    for name in ("dit_wan21", "dit_wan22_high", "dit_wan22_low", "vae", "t5", "tokenizer_dir"):
        print(f"{name:15s} {getattr(kit, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
