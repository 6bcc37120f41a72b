"""``wantrainer config template``: the full, commented config template, generated from the schema.

Every key appears with its docstring, its type and its default, so the template can never drift from the code.
``configs/examples/full_config_template.toml`` is this output.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from . import FLAT_SECTIONS, DatasetsConfig, SamplePrompt
from .datasets import DatasetEntry
from .describe import describe_constraints, describe_type, is_table_list, model_in
from .toml_writer import format_key, format_value

_TITLES = {
    "model": "Model files, precision and memory",
    "training": "Training length and data loading",
    "optimizer": "Optimiser and learning-rate schedule",
    "network": "LoRA network",
    "timesteps": "Timestep sampling and loss weighting",
    "loss": "Loss",
    "saving": "Saving and resuming",
    "logging": "Logging",
    "validation": "Validation loss",
    "sampling": "Sample generation",
}

_HEADER = """\
# wantrainer: full config template, generated from the schema (`wantrainer config template`).
#
# Every key is listed with its documentation, the kind of value it takes and its default. Keys that are
# commented out are unset by default. Top-level keys come first and have no table header; the dataset
# blueprint ([datasets.*]) and the [[sample_prompts]] tables follow.
# Relative paths are resolved against the folder of this file; ~ expands to your home folder.
"""

# Example dataset tables: (comment, values). Values are checked against the schema by the tests.
_TRAIN_EXAMPLES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("Images, each with a caption file beside it (photo.png + photo.txt).",
     {"image_directory": "dataset/images", "cache_directory": "dataset/cache/images", "num_repeats": 1}),
    ("Videos: windows of 1, 25 and 45 frames taken from the start of each clip.",
     {"video_directory": "dataset/videos", "cache_directory": "dataset/cache/videos",
      "target_frames": [1, 25, 45], "frame_extraction": "head"}),
)
_VAL_EXAMPLES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("Held-out items for the validation loss (optional).",
     {"image_directory": "dataset/val_images", "cache_directory": "dataset/cache/val"}),
)
_SAMPLE_PROMPT_TEXT = "a red fox running through fresh snow, cinematic lighting"


def _default(field: FieldInfo) -> Any:
    return field.get_default(call_default_factory=True)


def _doc_lines(field: FieldInfo) -> list[str]:
    lines = [f"# {line}".rstrip() for line in (field.description or "").strip().splitlines()]
    kind = describe_type(field.annotation)
    bounds = describe_constraints(field)
    unset = _default(field) is None if not field.is_required() else False
    extra = "; ".join(x for x in (bounds, "unset by default" if unset else "",
                                 "required" if field.is_required() else "") if x)
    lines.append(f"# Type: {kind}{'; ' + extra if extra else ''}.")
    return lines


def _key_lines(name: str, field: FieldInfo, value: Any = None, use_default: bool = True) -> list[str]:
    """Doc comment, then ``key = value`` (commented out when there is no value to write)."""
    if use_default:
        value = None if field.is_required() else _default(field)
    if isinstance(value, BaseModel):
        value = value.model_dump(exclude_none=True)
    lines = _doc_lines(field)
    lines.append(f"# {format_key(name)} =" if value is None else f"{format_key(name)} = {format_value(value)}")
    return lines


def _fields_block(cls: type[BaseModel], skip_tables: bool = True) -> list[str]:
    lines: list[str] = []
    for name, field in cls.model_fields.items():
        if skip_tables and (is_table_list(field.annotation) or _is_table(field)):
            continue
        lines.extend(["", *_key_lines(name, field)])
    return lines


def _is_table(field: FieldInfo) -> bool:
    sub = model_in(field.annotation)
    return sub is not None and not is_table_list(field.annotation)


def _example_table(header: str, comment: str, cls: type[BaseModel], values: dict[str, Any]) -> list[str]:
    lines = ["", f"# {comment}", header]
    for key, value in values.items():
        if key not in cls.model_fields:
            raise KeyError(f"template example uses `{key}`, which {cls.__name__} does not have")
        lines.append(f"{format_key(key)} = {format_value(value)}")
    return lines


def _section_title(name: str, cls: type[BaseModel]) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()
    return _TITLES.get(name) or (doc[0] if doc else name)


def _datasets_block() -> list[str]:
    fields = DatasetsConfig.model_fields
    lines = ["", "", "# ==== Datasets ====", "", f"# {fields['general'].description}",
             "# Each [[datasets.train]] / [[datasets.val]] table may set any of these keys for itself.",
             "[datasets.general]"]
    lines.extend(_fields_block(DatasetEntry))
    for comment, values in _TRAIN_EXAMPLES:
        lines.extend(_example_table("[[datasets.train]]", comment, DatasetEntry, values))
    for comment, values in _VAL_EXAMPLES:
        lines.extend(_example_table("[[datasets.val]]", comment, DatasetEntry, values))
    for key in ("latent_cache", "text_encoder_cache"):
        sub = model_in(fields[key].annotation)
        assert sub is not None
        lines.extend(["", f"# {fields[key].description}", f"[datasets.{key}]"])
        lines.extend(_fields_block(sub))
    return lines


def _commented_table_list_block(name: str, field: FieldInfo, sub: type[BaseModel]) -> list[str]:
    """An array of tables whose entries turn a feature on: shown commented out, with example values."""
    doc = [f"# {line}".rstrip() for line in (field.description or "").strip().splitlines()]
    lines = ["", "", f"# ==== [[{name}]] ====", "", *doc, "# Uncomment and repeat the table once per entry.",
             f"# [[{name}]]"]
    for key, sub_field in sub.model_fields.items():
        example = sub_field.examples[0] if sub_field.examples else (None if sub_field.is_required()
                                                                     else _default(sub_field))
        lines.extend(["", *_doc_lines(sub_field),
                      f"# {format_key(key)} =" if example is None else f"# {format_key(key)} = {format_value(example)}"])
    return lines


def _table_list_block(name: str, field: FieldInfo) -> list[str]:
    sub = model_in(field.annotation)
    assert sub is not None
    if sub is not SamplePrompt:
        return _commented_table_list_block(name, field, sub)
    lines = ["", "", f"# ==== [[{name}]] ====", "", f"# {field.description}", "# Repeat the table once per entry.",
             f"[[{name}]]"]
    for key, sub_field in sub.model_fields.items():
        if sub is SamplePrompt and key == "text":
            lines.extend(["", *_key_lines(key, sub_field, _SAMPLE_PROMPT_TEXT, use_default=False)])
        else:
            lines.extend(["", *_key_lines(key, sub_field)])
    return lines


def render_template() -> str:
    """The whole template as TOML text (it parses, and every key holds its default)."""
    lines = [_HEADER.rstrip("\n")]
    tables: list[tuple[str, FieldInfo]] = []
    table_lists: list[tuple[str, FieldInfo]] = []
    for section, cls in FLAT_SECTIONS.items():
        lines.extend(["", "", f"# ==== {_section_title(section, cls)} ===="])
        lines.extend(_fields_block(cls))
        for name, field in cls.model_fields.items():
            if is_table_list(field.annotation):
                table_lists.append((name, field))
            elif _is_table(field):
                tables.append((name, field))
    for name, field in tables:
        sub = model_in(field.annotation)
        assert sub is not None
        lines.extend(["", "", f"# {field.description}", f"[{format_key(name)}]"])
        lines.extend(_fields_block(sub))
    lines.extend(_datasets_block())
    for name, field in table_lists:
        lines.extend(_table_list_block(name, field))
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    text = render_template()
    if args.output:
        from ..utils.atomic import write_text_atomic

        write_text_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return 0
