"""Turn schema violations into messages a user can act on.

Every message names the key (``datasets.train[0].batch_size``), says what was expected and what was found,
and, for unknown keys or values, suggests the nearest valid one.
"""

from __future__ import annotations

import difflib
import re
import tomllib
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .describe import describe_type, is_table_list, kind_matches, list_item_type, model_in, value_kind
from .toml_writer import format_value

_MAX_SHOWN = 80
_EXPECTED_BY_ERROR = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
    "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
    "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
    "dict_type": "a table", "model_type": "a table", "path_type": "a path",
}


def show(value: Any) -> str:
    """A value as it would be written in TOML, shortened when long."""
    try:
        text = format_value(value)
    except TypeError:
        text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def nearest(word: str, candidates: typing.Iterable[str]) -> str | None:
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_key_message(key: str, valid: typing.Iterable[str], where: str = "") -> str:
    """``unknown key `where.key`; did you mean `where.close`?`` (``where`` is the table, "" at top level)."""
    from .foreign import foreign_hint

    prefix = f"{where}." if where else ""
    foreign = foreign_hint(key)
    if foreign is not None:
        return f"unknown key `{prefix}{key}`: {foreign}"
    close = nearest(key, valid)
    hint = f"; did you mean `{prefix}{close}`?" if close else "; see `wantrainer config template` for every key"
    return f"unknown key `{prefix}{key}`{hint}"


def _fields_with_before_validators(cls: type[BaseModel]) -> set[str]:
    """Fields whose own validator accepts extra input forms (e.g. a comma string for a list)."""
    decorators = cls.__pydantic_decorators__.field_validators.values()
    return {name for d in decorators if d.info.mode in ("before", "wrap", "plain") for name in d.info.fields}


def wrong_kind_message(key: str, annotation: Any, value: Any) -> str:
    expected = describe_type(annotation)
    message = f"`{key}` must be {expected}, got {show(value)} ({value_kind(value)})"
    if isinstance(value, dict) and is_table_list(annotation):
        name = key.rsplit(".", 1)[-1] if not key.startswith("datasets.") else key
        message += f"; write [[{name}]] with double brackets, once per entry"
    elif isinstance(value, str) and kind_matches(annotation, _unquoted(value)):
        message += f"; write it without quotes: {value.strip()}"
    elif not isinstance(value, list) and (item := list_item_type(annotation)) is not None \
            and kind_matches(item, value):
        message += f"; write it as a list: [{show(value)}]"
    return message


def _unquoted(text: str) -> Any:
    """What ``text`` would be if written without quotes (None when that is not a TOML value)."""
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except (tomllib.TOMLDecodeError, IndexError):
        return None


def check_kinds(cls: type[BaseModel], values: dict[str, Any], prefix: str, problems: list[str]) -> dict[str, Any]:
    """Report values of the wrong TOML kind and return ``values`` without them (recursing into tables).

    Values are left out so that pydantic reports only the remaining, independent problems.
    """
    lenient = _fields_with_before_validators(cls)
    kept: dict[str, Any] = {}
    for key, value in values.items():
        field = cls.model_fields.get(key)
        if field is None:  # unknown: pydantic reports it with the nearest name
            kept[key] = value
            continue
        name = f"{prefix}{key}"
        if key in lenient:
            kept[key] = value
            continue
        if not kind_matches(field.annotation, value):
            problems.append(wrong_kind_message(name, field.annotation, value))
            continue
        checked = _check_inner(field, value, name, problems)
        if checked is not _BAD:
            kept[key] = checked
    return kept


_BAD = object()


def _check_inner(field: FieldInfo, value: Any, name: str, problems: list[str]) -> Any:
    sub = model_in(field.annotation)
    if sub is not None and isinstance(value, dict):
        return check_kinds(sub, value, f"{name}.", problems)
    if isinstance(value, list):
        item_type = list_item_type(field.annotation)
        if item_type is None:
            return value
        out = []
        for index, item in enumerate(value):
            if not kind_matches(item_type, item):
                problems.append(f"`{name}[{index}]` must be {describe_type(item_type)}, got {show(item)} "
                                f"({value_kind(item)})")
                return _BAD
            item_model = model_in(item_type)
            out.append(check_kinds(item_model, item, f"{name}[{index}].", problems) if item_model else item)
        return out
    return value


def loc_to_key(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as a TOML key path: ``("train", 0, "batch_size")`` -> ``train[0].batch_size``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not part.isidentifier():
            continue  # union branch names ("int", "list[int]", "literal['a']") are not part of the key
        else:
            out += f".{part}" if out else str(part)
    return out


def _step(current: type[BaseModel], part: str) -> tuple[FieldInfo | None, type[BaseModel] | None]:
    field = current.model_fields.get(part)
    return field, (model_in(field.annotation) if field is not None else None)


def model_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Follow an error location down nested models to the model that holds the last key."""
    current: type[BaseModel] | None = cls
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        if isinstance(part, str) and part in current.model_fields:
            current = _step(current, part)[1]
        elif isinstance(part, str) and part.isidentifier():
            return None
    return current


def field_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> FieldInfo | None:
    parent = model_at(cls, loc[:-1]) if loc else None
    names = [p for p in loc if isinstance(p, str) and p.isidentifier()]
    if parent is None or not names:
        return None
    return parent.model_fields.get(names[-1])


def _literal_options(annotation: Any) -> list[str]:
    if typing.get_origin(annotation) is Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return [opt for arg in typing.get_args(annotation) for opt in _literal_options(arg)]


def format_error(cls: type[BaseModel], err: Any, prefix: str, flat_keys: typing.Collection[str] = ()) -> str:
    """One pydantic error as a user message (``prefix`` is the table path, e.g. "datasets.")."""
    loc = tuple(err.get("loc", ()))
    key = prefix + loc_to_key(loc)
    kind = err.get("type", "")
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return _extra_key_message(cls, loc, prefix, flat_keys)
    if kind == "missing":
        return f"`{key}` is required but missing"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        bound = next(iter(ctx.values()), "?")
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"`{key}` must be {bounds[kind]} {bound}, got {show(value)}"
    if kind == "multiple_of":
        return f"`{key}` must be a multiple of {ctx.get('multiple_of')}, got {show(value)}"
    if kind == "string_too_short":
        return f"`{key}` must not be empty"
    if kind == "literal_error":
        field = field_at(cls, loc)
        options = _literal_options(field.annotation) if field is not None else []
        allowed = ", ".join(f'"{o}"' for o in options) or ctx.get("expected", "")
        folded = {o.lower(): o for o in options}
        close = folded.get(str(value).lower()) or nearest(str(value), options)
        hint = f"; did you mean \"{close}\"?" if close else ""
        return f"`{key}` must be one of {allowed}, got {show(value)}{hint}"
    expected = _EXPECTED_BY_ERROR.get(kind)
    if expected is not None:
        return f"`{key}` must be {expected}, got {show(value)} ({value_kind(value)})"
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind in ("value_error", "assertion_error"):
        return f"`{key}`: {message}"
    return f"`{key}`: {message}, got {show(value)}"


def _extra_key_message(cls: type[BaseModel], loc: tuple[Any, ...], prefix: str, flat_keys: typing.Collection[str]) -> str:
    parent_cls = model_at(cls, loc[:-1])
    valid = sorted(parent_cls.model_fields) if parent_cls is not None else []
    where = (prefix + loc_to_key(loc[:-1])).rstrip(".")
    name = str(loc[-1])
    message = unknown_key_message(name, valid, where)
    if name in flat_keys:
        message = (f"`{name}` is a top-level key but was found in {_table_name(where)}: keys written after a "
                   "[table] header belong to that table, so move it above the first header")
    return message


def _table_name(where: str) -> str:
    """``datasets.train[1]`` -> "the 2nd [[datasets.train]] table"; ``datasets.general`` -> "[datasets.general]"."""
    found = re.fullmatch(r"(.+)\[(\d+)\]", where)
    if not found:
        return f"[{where}]"
    number = int(found.group(2)) + 1
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"the {number}{suffix} [[{found.group(1)}]] table"
