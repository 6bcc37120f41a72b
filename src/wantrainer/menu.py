"""``wantrainer menu``: pick a config under ``configs/`` and an operation by number, then run it.

What ``run_trainer`` shows when started without arguments. Reads the choices from stdin, so it can be
scripted (``printf '1\\n1\\n' | wantrainer menu``).
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
    ("train", "train the LoRA"),
    ("sample", "generate the [[sample_prompts]] videos"),
)


def available_operations() -> list[tuple[str, str]]:
    """The operations whose command module is installed."""
    from .cli import COMMANDS

    modules = {cmd.name: cmd.handler.split(":")[0] for cmd in COMMANDS}
    return [(name, text) for name, text in OPERATIONS if importlib.util.find_spec(modules[name]) is not None]


def find_configs(root: Path) -> list[Path]:
    """Every ``*.toml`` under ``root``, sorted, as paths relative to the working folder when possible."""
    if not root.is_dir():
        return []
    found = sorted(p for p in root.rglob("*.toml") if p.is_file())
    cwd = Path.cwd()
    return [p.relative_to(cwd) if p.is_relative_to(cwd) else p for p in found]


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
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    root = Path("configs")
    configs = find_configs(root)
    if not configs:
        raise UserError(f"no .toml config found under {root.resolve()}: write one (see configs/examples in the "
                        "project, or `wantrainer config template`) or run `wantrainer <command> --config FILE`")
    operations = available_operations()
    picked_config = choose("Config files:", [str(p) for p in configs], stdin, stdout)
    if picked_config is None:
        return 0
    picked_op = choose("Operations:", [f"{name:<14} {text}" for name, text in operations], stdin, stdout)
    if picked_op is None:
        return 0
    command = [operations[picked_op][0], "--config", str(configs[picked_config])]
    stdout.write(f"\n> wantrainer {' '.join(command)}\n")
    stdout.flush()
    from .cli import main

    return main(command)
