"""The metadata of saved LoRA files beyond the training facts: publish keys, portable config, kohya's hashes.

- ``sshs_model_hash`` / ``sshs_legacy_hash`` are computed as kohya's sd-scripts (and musubi-tuner) compute them
  (``precalculate_safetensors_hashes``): the tensors are serialised with only the ``ss_*`` metadata; the model
  hash is the sha256 of the tensor data (everything after the header), the legacy hash the first 8 hex digits
  of the sha256 of the 64 KiB at offset 1 MiB of that serialisation.
- The config embedded as ``ss_config_toml`` keeps file and folder names only, unless ``metadata_full_paths``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of a LoRA about to be written with ``tensors`` and ``metadata``."""
    from safetensors.torch import save

    training = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save(dict(tensors), training or None)
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header:]).hexdigest()
    legacy_hash = hashlib.sha256(data[_LEGACY_OFFSET:_LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


def publish_metadata(section: Any, title: str) -> dict[str, str]:
    """``modelspec.*`` keys (and kohya's ``ss_training_comment``) from the ``metadata_*`` config keys."""
    meta = {"modelspec.title": section.metadata_title or title}
    for key, value in (("author", section.metadata_author), ("description", section.metadata_description),
                       ("license", section.metadata_license)):
        if value:
            meta[f"modelspec.{key}"] = value
    if section.metadata_tags:
        meta["modelspec.tags"] = ",".join(section.metadata_tags)
    if section.metadata_trigger_words:
        meta["modelspec.trigger_phrase"] = ",".join(section.metadata_trigger_words)
    if section.metadata_description and not section.no_metadata:
        meta["ss_training_comment"] = section.metadata_description
    return meta


def without_training_facts(meta: Mapping[str, str]) -> dict[str, str]:
    """``no_metadata = true``: the architecture and publish keys only (no ``ss_*``, no date, no resolution)."""
    kept = ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
            "modelspec.author", "modelspec.description", "modelspec.license", "modelspec.tags",
            "modelspec.trigger_phrase")
    return {k: v for k, v in meta.items() if k in kept}


def _names_only(value: Any, path_like: bool = False) -> Any:
    if isinstance(value, Path):
        return value.name
    if isinstance(value, dict):
        return {k: _names_only(v, k == "t5_tokenizer") for k, v in value.items()}
    if isinstance(value, list):
        return [_names_only(v) for v in value]
    if path_like and isinstance(value, str) and (value.startswith(("/", "~", ".")) or "\\" in value):
        return Path(value.replace("\\", "/")).name
    return value


def portable_config_toml(cfg: Any) -> str:
    """The resolved config as TOML with every path reduced to its last part (``/home/me/models/x.safetensors`` ->
    ``x.safetensors``), so a published LoRA does not carry the folders of the machine it was trained on."""
    from ..config.toml_writer import dump_toml

    return dump_toml(_names_only(cfg.to_dict()))
