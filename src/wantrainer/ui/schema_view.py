"""The config schema as form descriptors for the page: sections, fields, kinds, choices, defaults and docs.

Built from the same pydantic classes as the parser and the template (``config/``), with the same words for
types (``config/describe.py``), so the form can never offer a key the parser does not know.
"""

from __future__ import annotations

import typing
from pathlib import Path, PurePath
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ..config import FLAT_SECTIONS, DatasetsConfig, SamplePrompt
from ..config.datasets import DatasetEntry
from ..config.describe import (
    _strip_annotated,
    _union_args,
    describe_constraints,
    describe_type,
    is_table_list,
)
from ..config.template import _TITLES

_NoneType = type(None)


def _json_value(value: Any) -> Any:
    if isinstance(value, PurePath):
        return value.as_posix()
    if isinstance(value, BaseModel):
        return _json_value(value.model_dump(exclude_none=True))
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return value


def _input_kind(annotation: Any) -> tuple[str, list[Any] | None, bool]:
    """(input kind, choices, optional): "bool" | "int" | "number" | "text" | "select" | "value"."""
    annotation = _strip_annotated(annotation)
    optional = False
    union = _union_args(annotation)
    if union is not None:
        optional = _NoneType in union
        branches = [a for a in union if a is not _NoneType]
        if set(branches) <= {int, float}:
            return ("int" if branches == [int] else "number"), None, optional
        if len(branches) == 1:
            kind, choices, _ = _input_kind(branches[0])
            return kind, choices, optional
        return "value", None, optional
    if typing.get_origin(annotation) is Literal:
        return "select", list(typing.get_args(annotation)), optional
    simple = {bool: "bool", int: "int", float: "number", str: "text", Path: "text"}
    return simple.get(annotation, "value"), None, optional


def field_view(name: str, field: FieldInfo) -> dict[str, Any]:
    kind, choices, optional = _input_kind(field.annotation)
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    return {
        "key": name,
        "kind": kind,
        "choices": choices,
        "optional": optional or default is None,
        "type": describe_type(field.annotation),
        "constraints": describe_constraints(field),
        "default": _json_value(default),
        "required": field.is_required(),
        "doc": (field.description or "").strip(),
    }


def _fields(cls: type[BaseModel], skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return [field_view(name, f) for name, f in cls.model_fields.items()
            if name not in skip and not is_table_list(f.annotation)]


def schema_view() -> dict[str, Any]:
    """Everything the form needs: flat sections, the dataset blueprint and the sample prompt table."""
    sections = [{"name": name, "title": _TITLES.get(name, name), "fields": _fields(cls)}
                for name, cls in FLAT_SECTIONS.items()]
    ds = DatasetsConfig.model_fields
    return {
        "sections": sections,
        "dataset_entry": _fields(DatasetEntry),
        "datasets": {
            "general": {"doc": ds["general"].description},
            "train": {"doc": ds["train"].description},
            "val": {"doc": ds["val"].description},
            "latent_cache": {"doc": ds["latent_cache"].description,
                             "fields": _fields(DatasetsConfig.model_fields["latent_cache"].annotation)},
            "text_encoder_cache": {"doc": ds["text_encoder_cache"].description,
                                   "fields": _fields(DatasetsConfig.model_fields["text_encoder_cache"].annotation)},
        },
        "sample_prompt": _fields(SamplePrompt),
    }
