"""``wantrainer menu``: pick a config and an operation by number, run it, and come back to the list.

What ``run_trainer`` shows when started without arguments. The configs are the ``*.toml`` files of the working
folder and everything under ``configs/`` (the generated full template is not offered: it is a reference, not a
run). Reads the choices from stdin, so it can be scripted (``printf '1\\n1\\nq\\n' | wantrainer menu``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import TextIO

from .errors import UserError

# (command, what it does) in the order a user runs them.
OPERATIONS: tuple[tuple[str, str], ...] = (
    ("validate", "check the config, its files and datasets"),
    ("doctor", "inspect the datasets: items, captions, buckets, frames"),
    ("cache-latents", "encode the media to VAE latent caches"),
    ("cache-text", "encode the captions to text caches"),
    ("estimate", "predict the run's peak VRAM and RAM"),
    ("train", "train the LoRA"),
    ("sample", "generate the [[sample_prompts]] videos"),
)


def available_operations() -> list[tuple[str, str]]:
    """The operations whose command module is installed."""
    from .cli import COMMANDS

    modules = {cmd.name: cmd.handler.split(":")[0] for cmd in COMMANDS}
    return [(name, text) for name, text in OPERATIONS if importlib.util.find_spec(modules[name]) is not None]


TEMPLATE_MARK = "# wantrainer: full config template, generated from the schema"


def is_generated_template(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().startswith(TEMPLATE_MARK)
    except (OSError, UnicodeDecodeError):
        return False


def find_configs(root: Path) -> list[Path]:
    """Every ``*.toml`` under ``root`` except the generated template, sorted, relative to the working folder
    when possible."""
    if not root.is_dir():
        return []
    found = sorted(p for p in root.rglob("*.toml") if p.is_file() and not is_generated_template(p))
    cwd = Path.cwd()
    return [p.relative_to(cwd) if p.is_relative_to(cwd) else p for p in found]


def configs_here(also: list[Path] | None = None) -> list[Path]:
    """The configs of the working folder (not its subfolders), then those under ``configs/``, then under each
    ``also`` folder (the launcher adds the project's ``configs/``)."""
    found = sorted(p for p in Path(".").glob("*.toml") if p.is_file() and not is_generated_template(p))
    for root in [Path("configs"), *(also or [])]:
        seen = {p.resolve() for p in found}
        found += [p for p in find_configs(root) if p.resolve() not in seen]
    return found


def choose(title: str, options: list[str], stdin: TextIO, stdout: TextIO) -> int | None:
    """Print numbered options and read a choice; None when the user quits (q or end of input)."""
    stdout.write(f"\n{title}\n")
    for number, option in enumerate(options, start=1):
        stdout.write(f"  {number:>2}. {option}\n")
    while True:
        stdout.write(f"number (1-{len(options)}, q to quit): ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip().lower() in ("q", "quit", "exit"):
            stdout.write("\n")
            return None
        answer = line.strip()
        if answer.isdigit() and 1 <= int(answer) <= len(options):
            return int(answer) - 1
        stdout.write(f"'{answer}' is not a choice\n")


def run(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Loop: config, operation, run; back to the configs after each operation. Returns the last exit code."""
    from .cli import main

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    also = args.also if args is not None and args.also else []
    configs = configs_here([Path(p) for p in also])
    if not configs:
        raise UserError(f"no .toml config in {Path.cwd()} or its configs/ folder: write one (start from "
                        "configs/examples in the project, or `wantrainer config import` / `wantrainer config "
                        "template`) or run `wantrainer <command> --config FILE`")
    operations = available_operations()
    code = 0
    while True:
        picked_config = choose("Config files:", [str(p) for p in configs], stdin, stdout)
        if picked_config is None:
            return code
        picked_op = choose("Operations:", [f"{name:<14} {text}" for name, text in operations], stdin, stdout)
        if picked_op is None:
            return code
        command = [operations[picked_op][0], "--config", str(configs[picked_config])]
        stdout.write(f"\n> wantrainer {' '.join(command)}\n")
        stdout.flush()
        code = main(command)
        stdout.write(f"\n(exit code {code})\n")
