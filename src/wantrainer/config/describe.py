"""What a schema field expects, in words, and whether a TOML value has the right kind.

Shared by the config parser (error messages) and the template generator (one type line per key), so both
always describe a key the same way.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

_NoneType = type(None)


def _union_args(annotation: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(annotation)
    return None


def _strip_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (directly, optionally, or as list items), if any."""
    annotation = _strip_annotated(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in _union_args(annotation) or typing.get_args(annotation):
        found = model_in(arg)
        if found is not None:
            return found
    return None


def is_table_list(annotation: Any) -> bool:
    """True for ``list[SomeSection]`` fields (TOML arrays of tables such as ``[[sample_prompts]]``)."""
    annotation = _strip_annotated(annotation)
    return typing.get_origin(annotation) is list and model_in(annotation) is not None


def describe_type(annotation: Any) -> str:
    """A short phrase for the expected value: "an integer", "a path", "one of "a", "b"", ..."""
    annotation = _strip_annotated(annotation)
    union = _union_args(annotation)
    if union is not None:
        branches = [a for a in union if a is not _NoneType]
        if set(branches) == {int, float}:
            return "a number"
        names = list(dict.fromkeys(describe_type(a) for a in branches))
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(_literal_text(v) for v in typing.get_args(annotation))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if args and model_in(args[0]) is not None:
            return "a list of tables"
        inner = _plural(describe_type(args[0])) if args else "values"
        return f"a list of {inner}"
    if origin is dict:
        return "a table"
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              Path: "a path"}
    if annotation in simple:
        return simple[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a table"
    return getattr(annotation, "__name__", str(annotation))


def _plural(phrase: str) -> str:
    for article in ("an ", "a "):
        if phrase.startswith(article):
            word, _, rest = phrase[len(article):].partition(" ")
            return f"{word}s {rest}".strip()
    return phrase


def _literal_text(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def value_kind(value: Any) -> str:
    """The TOML kind of a parsed value, with its article: "a string", "an integer", ..."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a table"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def kind_matches(annotation: Any, value: Any) -> bool:
    """Whether a TOML value has a kind the field accepts (no string-to-number or string-to-bool coercion).

    Ranges and allowed values are left to pydantic; this only stops lax coercions such as ``"yes"`` -> True,
    ``"1e-4"`` -> 0.0001 or ``true`` -> 1, which hide mistakes in a hand-written file.
    """
    annotation = _strip_annotated(annotation)
    union = _union_args(annotation)
    if union is not None:
        return any(kind_matches(a, value) for a in union if a is not _NoneType)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return any(type(value) is type(v) for v in typing.get_args(annotation))
    if origin in (list, tuple):
        return isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation in (str, Path):
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return isinstance(value, dict)
    return True


def list_item_type(annotation: Any) -> Any | None:
    """The item type of a ``list[X]`` field (through ``X | None``), or None."""
    annotation = _strip_annotated(annotation)
    for candidate in (annotation, *(_union_args(annotation) or ())):
        if typing.get_origin(candidate) is list and typing.get_args(candidate):
            return typing.get_args(candidate)[0]
    return None


def describe_constraints(field: FieldInfo) -> str:
    """Numeric / length bounds of a field as text, e.g. ">= 1", "> 0, < 1", "multiple of 16"."""
    parts: list[str] = []
    for meta in field.metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            bound = getattr(meta, attr, None) if isinstance(meta, at.Ge | at.Gt | at.Le | at.Lt | at.Interval) \
                else None
            if bound is not None:
                parts.append(f"{symbol} {bound}")
        if isinstance(meta, at.MultipleOf):
            parts.append(f"multiple of {meta.multiple_of}")
        if isinstance(meta, at.MinLen) and meta.min_length == 1:
            parts.append("not empty")
    return ", ".join(parts)
