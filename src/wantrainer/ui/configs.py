"""Configs for the page: list the TOML files under the roots, read one, validate it as ``validate`` does, save it.

Saving keeps the user's comments and layout: the file is read with tomlkit and only the values that changed
are replaced (a key removed in the form is removed from the file; a changed array of tables such as
``[[datasets.train]]`` is rewritten item by item, so comments inside a changed item may go). The written text
is read back with ``tomllib`` and must equal what the form sent, and must pass the schema, before it replaces
the file (atomically).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import tomlkit

from ..config_parser import WanTrainerConfig, load_config, parse_config
from ..errors import ConfigError, UserError
from ..utils.atomic import write_text_atomic
from .security import Roots

_SKIP_DIRS = {".git", "__pycache__", ".venv", "node_modules", "cache", "logs", "sample"}
_KEY = re.compile(r"`([A-Za-z0-9_.\[\]]+)`")
MAX_CONFIGS = 500


def list_configs(roots: Roots) -> list[dict[str, Any]]:
    """``.toml`` files under the roots (hidden folders, caches and logs skipped), newest first."""
    found: list[Path] = []
    for root in roots.folders:
        stack = [root]
        while stack and len(found) < MAX_CONFIGS:
            folder = stack.pop()
            try:
                entries = sorted(folder.iterdir())
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir() and not entry.name.startswith(".") and entry.name not in _SKIP_DIRS:
                    stack.append(entry)
                elif entry.is_file() and entry.suffix == ".toml" and not entry.name.startswith("."):
                    found.append(entry.resolve())
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [{"path": str(p), "name": roots.display(p)} for p in found]


def problem_key(message: str) -> str | None:
    """The key a problem names first (``learning_rate``, ``datasets.train[0].image_directory``), if any."""
    found = _KEY.search(message)
    return found.group(1) if found else None


def _problems(messages: list[str]) -> list[dict[str, Any]]:
    return [{"key": problem_key(m), "message": m} for m in messages]


def parse_text(text: str) -> dict[str, Any]:
    """TOML text -> data; ``ConfigError`` with the line and column for malformed TOML."""
    from ..config_parser import _toml_error_message

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_toml_error_message(exc, text)]) from None


def check(data: dict[str, Any], path: Path, scan_media: bool = False) -> dict[str, Any]:
    """What ``validate`` finds for ``data`` as if it were the file at ``path``: schema problems first; when the
    schema passes, the files and folders it names, then each command's verdict (``commands``: command -> its
    problems; ``scan_media`` also counts each dataset's items, as ``validate`` does). ``ok``, as ``validate``'s
    default ``--for train``: schema, files and the train verdict are clean."""
    from ..validate import command_verdicts, report

    try:
        cfg = parse_config(data, config_dir=path.parent, source=str(path), config_path=path)
    except ConfigError as exc:
        return {"ok": False, "schema_ok": False, "problems": _problems(exc.problems), "notes": [], "report": "",
                "commands": {}}
    text, problems = report(cfg)
    notes = [line[len("note: "):] for line in text.splitlines() if line.startswith("note: ")]
    commands = command_verdicts(cfg, scan_media=scan_media) if not problems else {}
    train = commands.get("train", [])
    return {"ok": not problems and not train, "schema_ok": True, "problems": _problems(problems + train),
            "notes": notes, "report": text, "commands": commands, **output_of(cfg)}


def output_of(cfg: WanTrainerConfig) -> dict[str, str]:
    logs = cfg.logging.logging_dir or Path(cfg.saving.output_dir) / "logs"
    return {"output_dir": str(cfg.saving.output_dir), "output_name": cfg.saving.output_name, "logging_dir": str(logs)}


def read_config(roots: Roots, path: str) -> dict[str, Any]:
    file = roots.resolve(path)
    if file.suffix != ".toml" or not file.is_file():
        raise UserError(f"{path}: not a .toml file")
    text = file.read_text(encoding="utf-8")
    try:
        data = parse_text(text)
    except ConfigError as exc:
        return {"path": str(file), "text": text, "data": None, "ok": False, "schema_ok": False,
                "problems": _problems(exc.problems), "notes": [], "commands": {}}
    return {"path": str(file), "text": text, "data": data, **check(data, file, scan_media=True)}


def _plain(value: Any) -> Any:
    return value.unwrap() if hasattr(value, "unwrap") else value


def _merge(doc: Any, new: dict[str, Any]) -> None:
    """Make the tomlkit table ``doc`` hold ``new``, touching only what differs."""
    for key in [k for k in doc if k not in new]:
        del doc[key]
    for key, value in new.items():
        if key not in doc:
            doc[key] = value
            continue
        old = doc[key]
        if isinstance(value, dict) and isinstance(_plain(old), dict) and hasattr(old, "keys"):
            _merge(old, value)
        elif (isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
              and isinstance(old, tomlkit.items.AoT) and len(old) == len(value)):
            for item, item_value in zip(old, value):
                _merge(item, item_value)
        elif _plain(old) != value:
            doc[key] = value


def render(old_text: str | None, data: dict[str, Any]) -> str:
    """TOML text for ``data``, keeping the comments and layout of ``old_text`` where values did not change."""
    doc = tomlkit.parse(old_text) if old_text else tomlkit.document()
    _merge(doc, data)
    text = tomlkit.dumps(doc)
    if tomllib.loads(text) != data:  # never write something that reads back differently
        from ..config.toml_writer import dump_toml

        text = dump_toml(data)
    return text


def save_config(roots: Roots, path: str, *, text: str | None = None, data: dict[str, Any] | None = None,
                create: bool = False) -> dict[str, Any]:
    """Write the config at ``path`` from raw ``text`` or from form ``data``; refused when the TOML is malformed or
    the schema rejects it (``ConfigError``). Missing media or model files are reported, not refused."""
    file = roots.resolve(path)
    if file.suffix != ".toml":
        raise UserError(f"{path}: a config file name must end in .toml")
    if file.exists() and not file.is_file():
        raise UserError(f"{path}: is a folder")
    if not file.exists() and not create:
        raise UserError(f"{path} does not exist (create it with the \"new config\" button)")
    if (text is None) == (data is None):
        raise UserError("send either the TOML text or the form data")
    if text is None:
        old = file.read_text(encoding="utf-8") if file.exists() else None
        text = render(old, data)
    parsed = parse_text(text)
    parse_config(parsed, config_dir=file.parent, source=str(file), config_path=file)  # raises ConfigError
    file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(file, text)
    load_config(file)  # what the CLI will read
    return read_config(roots, str(file))
