"""Resolve the dataset blueprint: [datasets.general] defaults merged into each train / val entry."""

from __future__ import annotations

from ..config.datasets import DatasetEntry, DatasetsConfig

_SOURCE_KEYS = ("image_directory", "video_directory", "image_jsonl_file", "video_jsonl_file")


def merged_entry(general: DatasetEntry, entry: DatasetEntry) -> DatasetEntry:
    """The entry with every key it does not set taken from ``general``."""
    values = {k: getattr(general, k) for k in general.model_fields_set}
    values.update({k: getattr(entry, k) for k in entry.model_fields_set})
    return DatasetEntry.model_construct(**{**DatasetEntry().model_dump(), **values})


def blueprint_problems(datasets: DatasetsConfig) -> list[str]:
    """Problems of the blueprint as a whole (each names the entry)."""
    problems: list[str] = []
    for split in ("train", "val"):
        for index, raw in enumerate(getattr(datasets, split)):
            entry = merged_entry(datasets.general, raw)
            name = f"datasets.{split}[{index}]"
            sources = [k for k in _SOURCE_KEYS if getattr(entry, k) is not None]
            if not sources:
                problems.append(f"`{name}` has no media: set one of {', '.join(_SOURCE_KEYS)}")
            elif len(sources) > 1:
                problems.append(f"`{name}`: {' and '.join(f'`{k}`' for k in sources)} are mutually exclusive; use one source per dataset")
    return problems
