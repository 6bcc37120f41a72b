"""Write the training config saved in a LoRA's metadata (``ss_config_toml``) as a runnable TOML file.

    python tools/extract_config.py LORA.safetensors OUT.toml [--force]

The file holds the resolved config of the run that made the LoRA (every path absolute), exactly as saved; it is
checked by the same parser as ``wantrainer validate`` before it is written, and an existing OUT is only replaced
with ``--force``. Train it again with ``wantrainer train --config OUT.toml`` (change ``output_dir`` /
``output_name`` first: a run never overwrites an earlier run's files).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from wantrainer.cli import run_reporting_errors
from wantrainer.config_parser import parse_config
from wantrainer.errors import UserError
from wantrainer.networks.formats import read_safetensors
from wantrainer.utils.atomic import write_text_atomic


def extract(lora: str, out: str, force: bool = False) -> str:
    """Write the config; returns its text."""
    _, meta = read_safetensors(lora)
    text = meta.get("ss_config_toml")
    if not text:
        raise UserError(f"{lora}: no ss_config_toml in its metadata (it was not trained by wantrainer, or the "
                        "metadata was stripped); nothing to extract")
    target = Path(out)
    if target.exists() and not force:
        raise UserError(f"{target} exists; choose another path or pass --force to replace it")
    try:
        parse_config(tomllib.loads(text), config_dir=target.parent.resolve(), source=f"{lora} (ss_config_toml)")
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{lora}: the saved config is not valid TOML ({exc})") from None
    write_text_atomic(target, text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lora", help="a LoRA / LoHa / LoKr file written by wantrainer train")
    parser.add_argument("out", help="the .toml file to write")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    return run_reporting_errors(lambda: f"wrote {args.out} ({len(extract(args.lora, args.out, args.force))} "
                                        "characters); check it with: wantrainer validate --config " + args.out)


if __name__ == "__main__":
    sys.exit(main())
