"""What every importer shares: the result, relative paths, typed flag values, the final validation."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ConfigError, UserError


@dataclass(frozen=True)
class Dropped:
    """A key of the source that the new config does not carry, and why."""

    source: str
    key: str
    value: Any
    reason: str

    def line(self) -> str:
        from ..messages import show

        return f"{self.source}: `{self.key}` = {show(self.value)}: {self.reason}"


@dataclass
class ImportResult:
    data: dict[str, Any] = field(default_factory=dict)
    dropped: list[Dropped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def drop(self, source: str, key: str, value: Any, reason: str) -> None:
        self.dropped.append(Dropped(source, key, value, reason))

    def dataset_table(self, name: str) -> dict[str, Any]:
        return self.data.setdefault("datasets", {}).setdefault(name, {})


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{path}: not a TOML file ({exc})") from None


def relocate(value: str, source_dir: Path, output_dir: Path) -> str:
    """A relative path written for ``source_dir`` rewritten relative to ``output_dir`` (absolute ones stay)."""
    if not value or re.match(r"^[a-z]+://", value) or Path(value).expanduser().is_absolute():
        return value
    return Path(os.path.relpath(source_dir / value, output_dir)).as_posix()


def validate_result(result: ImportResult, output_dir: Path, source: str) -> None:
    """Drop (and list) every top-level value our schema refuses, until the config validates."""
    from ...config_parser import parse_config

    for _ in range(50):
        try:
            parse_config(result.data, config_dir=output_dir)
            return
        except ConfigError as exc:
            removed = False
            for problem in exc.problems:
                found = re.match(r"`?([a-z_0-9]+)`?[: ]", problem)
                key = found.group(1) if found else None
                if key is not None and key in result.data:
                    result.drop(source, key, result.data.pop(key), f"refused by the schema: {problem}")
                    removed = True
            if not removed:
                result.notes.extend(f"check: {p}" for p in exc.problems)
                return


def import_files(files: list[Path], source: str, output: Path) -> ImportResult:
    """Convert ``files`` (musubi-tuner: dataset TOML, --config_file TOML and / or a text file of flags;
    takenoko: one TOML) into a result for ``output``."""
    from . import musubi, takenoko

    if source == "musubi":
        result = musubi.convert(files, output.parent)
    elif source == "takenoko":
        result = takenoko.convert(files, output.parent)
    else:
        raise UserError(f"--from {source}: choose musubi or takenoko")
    validate_result(result, output.parent, source)
    return result
