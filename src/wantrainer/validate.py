"""``wantrainer validate --config X [--for COMMAND]``: parse a config, check the files it names, run every
command's own start-up checks (``preflight``: the same function the commands call) and summarise it.

Prints the values that differ from the defaults, one line per dataset and one verdict per command. Exit code 0
when the files are in place and the chosen command (``--for``, default ``train``; ``all`` for every one) can
start; 2, with every problem listed, otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .config.toml_writer import format_value
from .config_parser import WanTrainerConfig, load_config_for_command
from .errors import UserError

# (section, key, "file" | "dir" | "file-or-dir", what needs it when it is unset, or None when optional)
_MODEL_FILES: tuple[tuple[str, str, str, str | None], ...] = (
    ("model", "dit", "file", "train and sample"),
    ("model", "dit_high_noise", "file", None),
    ("model", "vae", "file", "cache-latents and sample"),
    ("model", "t5", "file", "cache-text and sample"),
    ("network", "network_weights", "file", None),
    ("saving", "resume", "dir", None),
)
_SOURCES = {
    "image_directory": ("images in", "dir"),
    "video_directory": ("videos in", "dir"),
    "image_jsonl_file": ("image list", "file"),
    "video_jsonl_file": ("video list", "file"),
}


def _missing(path: Path, kind: str) -> str | None:
    """Why ``path`` is unusable as a ``kind`` ("file" or "dir"), or None when it is fine."""
    if not path.exists():
        return "does not exist"
    if kind == "file" and not path.is_file():
        return "is a folder, expected a file"
    if kind == "dir" and not path.is_dir():
        return "is a file, expected a folder"
    return None


def _empty_media_folder(folder: Path, is_video: bool) -> str | None:
    """Why a media folder that exists is unusable (it holds no media of its kind), or None."""
    from .dataset.media import list_media, no_media_message

    if list_media(folder, is_video):
        return None
    return "holds " + no_media_message(folder, is_video).replace(f" in {folder}", "", 1)


def file_problems(cfg: WanTrainerConfig) -> tuple[list[str], list[str]]:
    """(problems, notes): referenced files and folders that are missing, and needed keys that are unset."""
    problems: list[str] = []
    notes: list[str] = []
    for section, key, kind, needed_by in _MODEL_FILES:
        value = getattr(getattr(cfg, section), key)
        if value is None:
            if needed_by:
                notes.append(f"`{key}` is not set: {needed_by} need it")
            continue
        why = _missing(Path(value), kind)
        if why:
            problems.append(f"`{key}` = {value} {why}")
    tokenizer = cfg.model.t5_tokenizer
    if tokenizer is not None and Path(tokenizer).is_absolute():
        why = _missing(Path(tokenizer), "dir")
        if why:
            problems.append(f"`t5_tokenizer` = {tokenizer} {why} (a folder with spiece.model, or a hub id)")
    elif tokenizer is not None:
        notes.append(f'`t5_tokenizer` = "{tokenizer}" is not a folder next to the config, so it is read as a '
                     "Hugging Face hub id from the local cache; write a path (e.g. ./tokenizer) for a folder")
    for split in ("train", "val"):
        for index, entry in enumerate(getattr(cfg.datasets, split)):
            for key, (_, kind) in _SOURCES.items():
                value = getattr(entry, key)
                why = _missing(Path(value), kind) if value is not None else None
                if why is None and value is not None and kind == "dir":
                    why = _empty_media_folder(Path(value), key == "video_directory")
                if why:
                    problems.append(f"`datasets.{split}[{index}].{key}` = {value} {why}")
    for where, entry in [("general", cfg.datasets.general)] + [(f"train[{i}]", e) for i, e in enumerate(cfg.datasets.train)]:
        why = _missing(Path(entry.mask_directory), "dir") if entry.mask_directory is not None else None
        if why:
            problems.append(f"`datasets.{where}.mask_directory` = {entry.mask_directory} {why}")
    if not cfg.datasets.train:
        notes.append("no [[datasets.train]] table: cache-latents, cache-text and train need at least one")
    return problems, notes


def _dataset_entries(cfg: WanTrainerConfig, split: str) -> list[Any]:
    """The datasets of a split with [datasets.general] merged in (resolved specs when possible)."""
    from .dataset import blueprint

    try:
        return list(blueprint.resolve_datasets(cfg.datasets, split))
    except UserError:
        pass  # file problems are reported separately; fall back to the merged entries
    return [blueprint.merged_entry(cfg.datasets.general, e) for e in getattr(cfg.datasets, split)]


def _resolution_text(resolution: Any) -> str:
    if isinstance(resolution, tuple | list) and len(resolution) == 2:
        return f"{resolution[0]}x{resolution[1]}"
    return str(resolution)


def dataset_summary(entry: Any, split: str, index: int) -> str:
    """One line: split and index, the media source, resolution, batch size, repeats (and frames for video)."""
    source = next(((label, getattr(entry, key)) for key, (label, _) in _SOURCES.items()
                   if getattr(entry, key) is not None), ("no media", ""))
    parts = [f"{split}[{index}]: {source[0]} {source[1]}".rstrip(),
             f"resolution {_resolution_text(entry.resolution)}" + (" (buckets)" if entry.enable_bucket else ""),
             f"batch {entry.batch_size}", f"repeats {entry.num_repeats}"]
    if entry.video_directory is not None or entry.video_jsonl_file is not None:
        frames = ", ".join(str(f) for f in entry.target_frames)
        parts.append(f"frames [{frames}] ({entry.frame_extraction})")
    if entry.is_reg:
        parts.append("regularisation")
    if entry.mask_directory is not None:
        parts.append(f"masks {entry.mask_directory} (mask_missing = \"{entry.mask_missing}\")")
    return ", ".join(parts)


def _changed_lines(cfg: WanTrainerConfig) -> list[str]:
    lines = []
    for key, value in cfg.non_default_values().items():
        if key == "sample_prompts":
            lines.append(f"  {key}: {len(value)} prompt{'s' if len(value) != 1 else ''}")
        elif value is None:
            lines.append(f"  {key} = (unset)")
        else:
            lines.append(f"  {key} = {format_value(value)}")
    return lines


def command_verdicts(cfg: WanTrainerConfig, scan_media: bool) -> dict[str, list[str]]:
    """command -> the problems that stop it (``preflight``); the media are scanned once for all of them."""
    from .preflight import COMMANDS, command_problems, dataset_item_problems

    media = dataset_item_problems(cfg, ("train", "val")) if scan_media and cfg.datasets.train else []
    return {c: command_problems(cfg, c) + (media if c != "sample" else []) for c in COMMANDS}


def _verdict_lines(verdicts: dict[str, list[str]]) -> list[str]:
    lines = ["commands:"]
    for command, problems in verdicts.items():
        lines.append(f"  {command}: " + ("ready" if not problems else "not ready"))
        lines.extend(f"    - {p}".replace("\n", "\n      ") for p in problems)
    return lines


def report(cfg: WanTrainerConfig) -> tuple[str, list[str]]:
    """The text that ``validate`` prints and the list of problems (empty when the config is usable)."""
    problems, notes = file_problems(cfg)
    lines = [f"config: {cfg.config_path}"]
    changed = _changed_lines(cfg)
    lines.append("values that differ from the defaults:" if changed else "every value is at its default")
    lines.extend(changed)
    for split in ("train", "val"):
        entries = _dataset_entries(cfg, split)
        if entries:
            lines.append(f"{split} datasets:")
            lines.extend("  " + dataset_summary(e, split, i) for i, e in enumerate(entries))
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines), problems


def run(args: argparse.Namespace) -> int:
    cfg = load_config_for_command(args)
    text, problems = report(cfg)
    print(text)
    if problems:
        head = f"{len(problems)} problem{'s' if len(problems) != 1 else ''} with the files and folders the config names:"
        raise UserError("\n".join([head] + [f"  - {p}" for p in problems]))
    verdicts = command_verdicts(cfg, scan_media=True)
    print("\n".join(_verdict_lines(verdicts)))
    wanted = list(verdicts) if args.for_command == "all" else [args.for_command]
    blocked = [c for c in wanted if verdicts[c]]
    if blocked:
        raise UserError(f"config not ready for {', '.join(blocked)}: fix the problems listed under "
                        f"\"commands:\" above (`--for` picks the command to check; default train)")
    print(f"config OK for {args.for_command if args.for_command != 'all' else 'every command'}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .preflight import COMMANDS

    parser.add_argument("--for", dest="for_command", choices=[*COMMANDS, "all"], default="train",
                        help="the command whose start-up checks decide the exit code (default train; all: every "
                             "command)")
