"""``wantrainer <command>``: the console entry point.

Each command is a small handler in the module that owns the work; this file only declares the commands,
their arguments, and turns user errors into a message and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import textwrap
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
    description: str = ""
    """What ``wantrainer <command> --help`` says beyond ``help``: what it reads, writes and needs first."""


def _validate_args(p: argparse.ArgumentParser) -> None:
    from .validate import add_arguments

    add_arguments(p)


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=None, metavar="FILE",
                   help="LoRA file to apply; give two for Wan 2.2 (high-noise and low-noise expert). "
                        "Without --lora the base model is sampled")
    p.add_argument("--multiplier", type=float, default=1.0, metavar="M",
                   help="LoRA strength (default 1.0); it is part of the file names, so strengths do not overwrite")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="render this prompt instead of the config's [[sample_prompts]] (repeatable); size, frames, "
                        "steps and seed come from the first [[sample_prompts]] table, else the defaults")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where to write the samples (default {output_dir}/sample)")
    p.add_argument("--image", default=None, metavar="FILE",
                   help="image-to-video models: the first frame of every prompt (replaces their `image`)")
    p.add_argument("--last-image", default=None, metavar="FILE",
                   help="FLF2V: the last frame of every prompt (replaces their `last_image`)")


def _estimate_args(p: argparse.ArgumentParser) -> None:
    from .estimate.cli import add_arguments

    add_arguments(p)


def _menu_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--also", action="append", default=None, metavar="DIR",
                   help="also list the configs under DIR (run_trainer.sh adds the project's configs/)")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="demo_output", metavar="DIR",
                   help="working folder for the demo (default ./demo_output)")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="training steps (default: the demo's own)")


def _config_args(p: argparse.ArgumentParser) -> None:
    from .config.commands import add_arguments

    add_arguments(p)


COMMANDS: tuple[Command, ...] = (
    Command("validate", "wantrainer.validate:run", "check a config: values, files, datasets and each command",
            _validate_args,
            description="Parses the config, checks that every file and folder it names exists (media folders must "
                        "hold media), runs the start-up checks of cache-latents, cache-text, train and sample (the "
                        "same code the commands run: options, Wan 2.2 experts, datasets that give no item), and "
                        "prints the values that differ from the defaults, one line per dataset and a verdict per "
                        "command. Exit 2 when the --for command (default train) would refuse to start. Loads no "
                        "model."),
    Command("config", "wantrainer.config.commands:run", "config tools (template, import)", _config_args,
            needs_config=False,
            description="`wantrainer config template` prints every key with its type, default and documentation. "
                        "`wantrainer config import FILE... --from musubi|takenoko -o new.toml` converts a "
                        "musubi-tuner dataset TOML and training arguments (a --config_file TOML or a text file with "
                        "the command line), or a Takenoko config, and lists every setting without an equivalent."),
    Command("doctor", "wantrainer.dataset.doctor:run", "inspect the datasets: items, captions, buckets, frames",
            description="Per dataset: items, missing captions, unreadable files, videos too short, caches present, "
                        "bucket and frame-count histograms (also written as {output_dir}/doctor_*.png). Exit 0 when "
                        "training can proceed, 2 when not. Loads no model."),
    Command("estimate", "wantrainer.estimate.cli:run", "predict the run's peak VRAM and RAM", _estimate_args,
            description="Predicts peak GPU memory and system RAM before anything is loaded: DiT weights by stored "
                        "dtype minus swapped blocks, LoRA and optimiser states, activations of the largest batch "
                        "(with / without gradient checkpointing and CPU offload), the encoders of the caching "
                        "commands. --vram GB prints the settings that make the run fit."),
    Command("cache-latents", "wantrainer.caching.cache_latents:run", "encode media to VAE latent caches",
            description="Encodes every image and video window of [[datasets.train]] and [[datasets.val]] with the "
                        "VAE (`vae`) into each dataset's cache_directory. Run before train, and again after "
                        "changing media or resolution; [datasets.latent_cache] holds its settings."),
    Command("cache-text", "wantrainer.caching.cache_text_encoder_outputs:run", "encode captions to text caches",
            description="Encodes every caption with the UMT5 text encoder (`t5`, `t5_tokenizer`) into each "
                        "dataset's cache_directory. Run before train, and again after changing captions; "
                        "[datasets.text_encoder_cache] holds its settings."),
    Command("train", "wantrainer.core.wan_network_trainer:run", "train a LoRA from the caches",
            description="Trains the LoRA on the cached latents and captions (run cache-latents and cache-text "
                        "first) and writes {output_dir}/{output_name}.safetensors. Ctrl-C finishes the current step, "
                        "saves a state folder and exits 130 (SIGTERM: 143); the same command continues the run "
                        "(auto_resume, on by default). One train per output_dir + output_name at a time; --resume FOLDER continues "
                        "from a given state. Any top-level key can be set for this run: --max_train_steps 10."),
    Command("sample", "wantrainer.sampling.cli:run", "generate the [[sample_prompts]] videos", _sample_args,
            description="Renders the config's [[sample_prompts]] with the base DiT(s) and the given LoRA(s)."),
    Command("demo", "wantrainer.devkit.demo:run", "end-to-end demo on a tiny model and synthetic data",
            _demo_args, needs_config=False,
            description="Builds a tiny Wan model kit and a synthetic dataset, then caches, trains and samples on "
                        "the CPU (a few minutes on 2 CPU cores; the README gives a measured time). Downloads "
                        "nothing."),
    Command("ui", "wantrainer.ui.serve:run", "the local web UI: configs, runs, curves and samples",
            lambda p: _load_handler("wantrainer.ui.serve:add_arguments")(p), needs_config=False,
            description="Serves a page on http://127.0.0.1:7860/ (--host / --port): edit configs as forms made from "
                        "the schema, start and stop the CLI commands, watch the loss curves, samples and saves. "
                        "Only the --root folders (default: the current one) are read or written; any host but "
                        "loopback needs the access token printed in the URL. Needs `pip install 'wantrainer[ui]'`."),
    Command("menu", "wantrainer.menu:run", "pick a config and an operation interactively", _menu_args,
            needs_config=False,
            description="Lists the .toml files of the working folder and under ./configs (not the generated "
                        "template) and the operations, reads two numbers from stdin, runs that command and comes "
                        "back to the list; q quits (what ./run_trainer.sh does without arguments)."),
)

_EPILOG = """\
a run, in order:
  wantrainer validate --config my.toml
  wantrainer doctor --config my.toml
  wantrainer cache-latents --config my.toml
  wantrainer cache-text --config my.toml
  wantrainer train --config my.toml

`wantrainer <command> --help` describes each command; every config key: `wantrainer config template`.
Exit codes: 0 done, 2 a mistake in the config, the files or the command line (the message says which),
130 / 143 interrupted by SIGINT (Ctrl-C) / SIGTERM (train: after saving a state)."""


def version_text() -> str:
    """``wantrainer --version``: this package, the Python and the torch it runs with (torch is not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    python = ".".join(map(str, sys.version_info[:3]))
    return f"wantrainer {__version__} (Python {python}, torch {torch_version})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wantrainer", description="LoRA trainer for Wan 2.1 / Wan 2.2 text-to-video models.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for cmd in COMMANDS:
        description = f"{cmd.help}\n\n{textwrap.fill(cmd.description, 100)}" if cmd.description else cmd.help
        p = sub.add_parser(cmd.name, help=cmd.help, description=description, aliases=list(cmd.aliases),
                           formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
        if cmd.needs_config:
            p.add_argument("--config", "-c", required=True, metavar="FILE",
                           help="the TOML config file (paths in it are relative to the file)")
        cmd.add_arguments(p)
        if cmd.needs_config:
            from .config.overrides import add_override_arguments

            add_override_arguments(p)
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
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        from .config.overrides import unknown_arguments_message

        print(f"error: {unknown_arguments_message(parser, args, unknown)}", file=sys.stderr)
        return 2
    if not getattr(args, "_handler", None):
        parser.print_help()
        return 2
    setup_logging("INFO")  # commands that load a config then apply its logging_level
    args.own_process = argv is None  # this process runs the command line (it may restart itself: train)
    try:
        _tell_parent_ready()
        return int(_load_handler(args._handler)(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except Exception as exc:
        from .core.signals import interruption_in

        cause = interruption_in(exc)
        if cause is None:
            raise
        return _interrupted(cause)


def _tell_parent_ready() -> None:
    """For a parent that sends Ctrl-C (the web UI): from here on SIGINT ends the command cleanly, so say so on
    the pipe it passed in ``WANTRAINER_READY_FD`` (one byte, then closed)."""
    fd = os.environ.pop("WANTRAINER_READY_FD", None)
    if fd is None:
        return
    with contextlib.suppress(OSError, ValueError):
        os.write(int(fd), b"1")
        os.close(int(fd))


def _interrupted(exc: KeyboardInterrupt) -> int:
    print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
    return int(getattr(exc, "exit_code", 130))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
