"""``wantrainer <command>``: the console entry point.

Each command is a small handler in the module that owns the work; this file only declares the commands,
their arguments, and turns user errors into a message and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .common.logger import setup_logging
from .errors import UserError


@dataclass(frozen=True)
class Command:
    name: str
    handler: str
    """"module:function" taking the parsed ``argparse.Namespace`` and returning an exit code."""
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None
    needs_config: bool = True
    aliases: tuple[str, ...] = field(default_factory=tuple)


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=None, help="LoRA file to apply (repeat for wan22 experts)")
    p.add_argument("--multiplier", type=float, default=1.0, help="LoRA strength (default 1.0)")
    p.add_argument("--output-dir", default=None, help="where to write the samples (default {output_dir}/sample)")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="demo_output", help="working folder for the demo (default ./demo_output)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")


def _template_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["template"], help="template: print the full config template")
    p.add_argument("--output", default=None, help="write to this file instead of stdout")


COMMANDS: tuple[Command, ...] = (
    Command("validate", "wantrainer.validate:run", "check a config: values, files and datasets"),
    Command("config", "wantrainer.config.template:run", "config tools (template)", _template_args, needs_config=False),
    Command("doctor", "wantrainer.dataset.doctor:run", "inspect the datasets: items, captions, buckets, frames"),
    Command("cache-latents", "wantrainer.caching.cache_latents:run", "encode media to VAE latent caches"),
    Command("cache-text", "wantrainer.caching.cache_text_encoder_outputs:run", "encode captions to text caches"),
    Command("train", "wantrainer.core.wan_network_trainer:run", "train a LoRA from the caches"),
    Command("sample", "wantrainer.sampling.cli:run", "generate the [[sample_prompts]] videos", _sample_args),
    Command("demo", "wantrainer.devkit.demo:run", "end-to-end demo on a tiny model and synthetic data",
            _demo_args, needs_config=False),
    Command("menu", "wantrainer.menu:run", "pick a config and an operation interactively", needs_config=False),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wantrainer", description="LoRA trainer for Wan 2.1 / Wan 2.2 text-to-video models."
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, aliases=list(cmd.aliases))
        if cmd.needs_config:
            p.add_argument("--config", "-c", required=True, help="the TOML config file")
        cmd.add_arguments(p)
        p.set_defaults(_handler=cmd.handler)
    return parser


def _load_handler(spec: str) -> Callable[[argparse.Namespace], int]:
    module_name, func_name = spec.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, func_name)


def run_reporting_errors(work: Callable[[], str]) -> int:
    """For scripts in ``tools/``: print what ``work`` returns (exit 0), or its ``UserError`` (exit 2, no traceback)."""
    try:
        message = work()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(message)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_handler", None):
        parser.print_help()
        return 2
    setup_logging("INFO")  # commands that load a config then apply its logging_level
    try:
        return int(_load_handler(args._handler)(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
