"""What the saved LoRA files say about themselves (top-level keys)."""

from __future__ import annotations

from pydantic import Field

from .base import Section


class MetadataConfig(Section):
    metadata_title: str | None = None
    """Title shown by model browsers (modelspec.title); default: the file's name, e.g. "my_lora-step00000500"."""
    metadata_author: str | None = None
    """Author (modelspec.author)."""
    metadata_description: str | None = None
    """Description (modelspec.description, and ss_training_comment as kohya's sd-scripts write it)."""
    metadata_license: str | None = None
    """License (modelspec.license), e.g. "apache-2.0" or "CreativeML Open RAIL-M"."""
    metadata_tags: list[str] = Field(default_factory=list)
    """Tags (modelspec.tags, comma-separated in the file)."""
    metadata_trigger_words: list[str] = Field(default_factory=list)
    """Words the prompts need for the LoRA to show (modelspec.trigger_phrase, comma-separated in the file)."""
    metadata_full_paths: bool = False
    """Keep the full paths of this machine (model files, dataset folders) in the config saved inside the LoRA; by
    default only the file and folder names are kept."""
    no_metadata: bool = False
    """Write no training metadata (no ss_* keys, no config): only the architecture, the keys above and the
    file's hashes (sshs_model_hash / sshs_legacy_hash)."""
