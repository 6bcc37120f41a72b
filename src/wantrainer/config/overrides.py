"""Top-level config keys on the command line: ``wantrainer train --config X --max_train_steps 10``.

One flag per top-level key, generated from the schema. A flag's text is read as a TOML value
(``--learning_rate 1e-4``, ``--network_args '["verbose=True"]'``) and falls back to a plain string where the key
takes one (``--optimizer_type adamw``), so the value is validated exactly as the same value written in the file.
A key that takes true / false also works as a switch (``--gradient_checkpointing``); a list key takes several
values (``--network_args "a=1" "b=2"``). Paths given on the command line are relative to the working folder.
"""

from __future__ import annotations

import argparse
import os
import tomllib
import typing
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from . import FLAT_SECTIONS
from .describe import describe_type, is_table_list, kind_matches, list_item_type

# Keys that hold a folder or a hub id: a command-line value is a path only when it looks like one.
PATH_OR_ID_KEYS = {"t5_tokenizer"}


def override_fields() -> dict[str, FieldInfo]:
    """Every top-level key that can be set on the command line (arrays of tables such as [[sample_prompts]]
    cannot)."""
    return {key: field for cls in FLAT_SECTIONS.values() for key, field in cls.model_fields.items()
            if not is_table_list(field.annotation)}


def _takes_bool(annotation: Any) -> bool:
    return annotation is bool or bool in typing.get_args(annotation)


def _is_path(annotation: Any) -> bool:
    return annotation is Path or Path in typing.get_args(annotation)


class _StoreOverride(argparse.Action):
    """Collects ``--key value`` into ``namespace.overrides`` as {key: text or [texts]} (order kept)."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001 - argparse's signature
        found = dict(getattr(namespace, "overrides", None) or {})
        found[self.dest.removeprefix("override__")] = values
        namespace.overrides = found


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--<key>`` for every top-level key (see the module docstring); they fill ``args.overrides``."""
    group = parser.add_argument_group(
        "config keys", "Any top-level key of the config, set for this run only (the file is not changed). The "
        "value is read as in TOML: --learning_rate 1e-4, --gradient_checkpointing, --network_args a=1 b=2.")
    parser.set_defaults(overrides=None)
    for key, field in override_fields().items():
        doc = (field.description or "").split(". ")[0].rstrip(".")
        options: dict[str, Any] = {"metavar": "V", "default": argparse.SUPPRESS, "action": _StoreOverride,
                                   "dest": f"override__{key}", "help": f"{doc} ({describe_type(field.annotation)})"}
        if _takes_bool(field.annotation):
            options.update(nargs="?", const="true", metavar="true|false")
        elif list_item_type(field.annotation) is not None:
            options.update(nargs="+")
        group.add_argument(f"--{key}", **options)


def _read_value(text: str, annotation: Any) -> Any:
    """A flag's text as a TOML value of the field's kind, else the text itself (validation names a mismatch)."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, KeyError):
        return text
    if kind_matches(annotation, value) or not kind_matches(annotation, text):
        return value
    return text


def _has_lenient_validator(key: str) -> bool:
    """Keys whose own validator also reads a string form (e.g. "200,500,800" for a list)."""
    for cls in FLAT_SECTIONS.values():
        decorators = cls.__pydantic_decorators__.field_validators.values()
        if any(key in d.info.fields and d.info.mode == "before" for d in decorators):
            return True
    return False


def _resolve_cli_path(value: Any, key: str, annotation: Any, cwd: Path) -> Any:
    if not isinstance(value, str):
        return value
    if _is_path(annotation) or (key in PATH_OR_ID_KEYS and (value.startswith(("~", ".", "/"))
                                                            or (cwd / value).exists())):
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else Path(os.path.abspath(cwd / path)))
    return value


def override_values(overrides: dict[str, Any] | None, cwd: Path | None = None) -> dict[str, Any]:
    """{key: text or [texts]} from the command line -> {key: TOML value}, paths made absolute from ``cwd``."""
    cwd = cwd or Path.cwd()
    fields = override_fields()
    values: dict[str, Any] = {}
    for key, raw in (overrides or {}).items():
        annotation = fields[key].annotation
        item = list_item_type(annotation)
        if isinstance(raw, list):
            if len(raw) == 1:
                value = _read_value(raw[0], annotation)
                if not isinstance(value, list) and not _has_lenient_validator(key):
                    value = [_read_value(raw[0], item)]
            else:
                value = [_read_value(text, item) for text in raw]
        else:
            value = _read_value(raw, annotation)
        values[key] = _resolve_cli_path(value, key, annotation, cwd)
    return values


def unknown_arguments_message(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]) -> str:
    """What to say about command-line words no option took: the nearest option, or ours for a foreign key."""
    from .foreign import foreign_hint
    from .messages import nearest

    command = getattr(args, "command", None)
    sub = next((a.choices[command] for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                and command in a.choices), parser)
    known = [o for o in sub._option_string_actions if o.startswith("--")]
    flags = [word for word in unknown if word.startswith("-")]
    if not flags:
        return f"unexpected argument(s) {' '.join(unknown)}; options are written --name VALUE"
    lines = []
    for flag in flags:
        name = flag.split("=", 1)[0]
        key = name.lstrip("-").replace("-", "_")
        hint = foreign_hint(key)
        if hint is not None:
            lines.append(f"unknown option {name}: {hint}")
            continue
        close = nearest(f"--{key}", known) or nearest(name, known)
        where = f"wantrainer {command} --help" if command else "wantrainer --help"
        lines.append(f"unknown option {name}" + (f"; did you mean {close}?" if close else f"; see `{where}`"))
    return "\n".join(lines)
