"""A small TOML writer for configs: strings, numbers, booleans, paths, lists, tables and arrays of tables.

``None`` values are left out (TOML has no null). The output reads back with ``tomllib`` to the same data
(paths come back as strings, tuples as lists).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def format_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else format_string(key)


def format_string(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _format_float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = repr(value)
    return text if any(c in text for c in ".en") else text + ".0"


def format_value(value: Any) -> str:
    """One value written inline: ``"text"``, ``1e-4``, ``true``, ``[1, 2]``, ``{ a = 1 }``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _format_float(value)
    if isinstance(value, str):
        return format_string(value)
    if isinstance(value, PurePath):
        return format_string(value.as_posix())
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value if v is not None) + "]"
    if isinstance(value, Mapping):
        items = [f"{format_key(str(k))} = {format_value(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise TypeError(f"cannot write a {type(value).__name__} to TOML: {value!r}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) > 0 and all(isinstance(v, Mapping) for v in value)


def _write_table(data: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = [(k, v) for k, v in data.items()
               if v is not None and not isinstance(v, Mapping) and not _is_table_array(v)]
    tables = [(k, v) for k, v in data.items() if isinstance(v, Mapping)]
    arrays = [(k, v) for k, v in data.items() if _is_table_array(v)]
    for key, value in scalars:
        lines.append(f"{format_key(str(key))} = {format_value(value)}")
    for key, value in tables:
        sub = [*path, format_key(str(key))]
        has_own = any(not isinstance(v, Mapping) and not _is_table_array(v) and v is not None
                      for v in value.values())
        if has_own or not value:
            lines.extend(["", f"[{'.'.join(sub)}]"])
        _write_table(value, sub, lines)
    for key, items in arrays:
        sub = [*path, format_key(str(key))]
        for item in items:
            lines.extend(["", f"[[{'.'.join(sub)}]]"])
            _write_table(item, sub, lines)


def dump_toml(data: Mapping[str, Any]) -> str:
    """Write a mapping as a TOML document (top-level keys first, then tables, then arrays of tables)."""
    lines: list[str] = []
    _write_table(data, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"
